"""The exceptions a user can cause.

Anything raised as :class:`FlatlabError` reaches the command line as a single line
``flatlab: error: <message>`` and exit status 2; every other exception is a bug in flatlab.

Library code names a bad setting by its parameter name, in the caller's words (``quant_start
must be smaller than steps (600), got 600``), by raising :class:`ConfigError`; the CLI rewrites
the parameter into its flag (``--quant-start ...``) and a study file into its key, so each caller
reads the name it typed.
"""

from __future__ import annotations


class FlatlabError(Exception):
    """A problem with the user's input (file, setting, data), with a message saying how to fix it."""


class ConfigError(FlatlabError):
    """A bad setting: ``key`` is the parameter, ``problem`` what is wrong with its value.

    ``str(error)`` reads ``"<key> <problem>"`` (e.g. ``"top_k must be at least 1, got 0"``); a
    caller that knows the parameter by another name (a CLI flag, a study-file key) rewrites it
    with :meth:`renamed`. Other parameters named in ``problem`` are written as they are.
    """

    def __init__(self, key: str, problem: str, measure: str | None = None) -> None:
        self.key = key
        self.problem = problem
        #: The measure whose setting ``key`` is (set by the config that raised it, or by the
        #: pipeline for an error raised while computing), so a caller that names settings by
        #: family (the CLI's flags) picks the right name.
        self.measure = measure
        super().__init__(f"{key} {problem}")

    def renamed(self, names: dict[str, str] | str, prefix: str = "") -> FlatlabError:
        """The same error with parameters called by ``names`` (parameter -> the caller's name, or
        just the caller's name of the key): the key, and every other parameter named in the
        problem text that is listed in ``names`` and is not a plain English word."""
        import re

        if isinstance(names, str):
            names = {self.key: names}
        problem = self.problem
        for name in sorted(names, key=len, reverse=True):
            if name == self.key or name in PLAIN_WORDS:
                continue
            problem = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", names[name], problem)
        return FlatlabError(f"{prefix}{names.get(self.key, self.key)} {problem}")


#: Parameter names that are also ordinary words: only the error's own key is rewritten, never
#: these words inside a sentence.
PLAIN_WORDS = frozenset({"split", "solver", "params", "samples", "seed", "device", "wrt", "hvp", "mode", "kind",
                         "steps", "method", "x", "y", "name", "norm", "ignore", "directions", "out", "results",
                         "workers", "backend", "address", "curvature", "layer", "points", "bn", "p", "m", "rho",
                         "model", "bits", "dataset", "algorithm", "data", "lr", "alpha", "tau", "members", "a", "b", "products", "kinds",
                         "scalings", "restarts"})

__all__ = ["PLAIN_WORDS", "ConfigError", "FlatlabError"]
