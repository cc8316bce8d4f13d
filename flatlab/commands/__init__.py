"""Sub-commands of the ``flatlab`` CLI (one module each, ``register(subparsers)``)."""
