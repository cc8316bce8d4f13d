"""The one exception type a user can cause.

Anything raised as :class:`FlatlabError` reaches the command line as a single line
``flatlab: error: <message>`` and exit status 2; every other exception is a bug in flatlab.
"""

from __future__ import annotations


class FlatlabError(Exception):
    """A problem with the user's input (file, flag, data), with a message saying how to fix it."""
