"""``python -m flatlab``: the same as the ``flatlab`` command."""

from flatlab.cli import run

run()
