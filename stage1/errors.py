"""The exceptions of stage1. The CLI prints each as one line ``error: MESSAGE``."""

from __future__ import annotations


class Stage1Error(Exception):
    """A failure the user can act on; the message says what failed and what to do.

    Exit status 1.
    """

    exit_status = 1

    def __init__(self, message: str, exit_status: int | None = None) -> None:
        super().__init__(message)
        if exit_status is not None:
            self.exit_status = exit_status


class UsageError(Stage1Error):
    """The command line is wrong. Exit status 2."""

    exit_status = 2


class DigestMismatch(Stage1Error):
    """A blob's bytes do not hash to its digest (or its size differs)."""


class InvalidImageConfig(Stage1Error):
    """An image config stage1 cannot run: a field of the wrong type, a NUL byte, an Env
    entry that is not NAME=VALUE, a string or list larger than execve(2) takes."""
