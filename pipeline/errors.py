"""One base for every expected failure, so the CLI has one handler and callers one thing to catch.

An expected failure is one an operator can fix from its message (a bad config value, a database that
is down, a model folder that is missing); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FinsentError(Exception):
    """An expected failure: its message is one line naming the input and the cause, never a secret.

    `exit_code` is what the CLI exits with: 1 for a failure at run time, 2 for bad usage or config.
    """

    exit_code: int = 1


class UsageError(FinsentError):
    """The command line or the config asks for something impossible; fixing the invocation fixes it."""

    exit_code = 2
