"""The one exception type of data problems."""

from __future__ import annotations


class DataError(RuntimeError):
    """A data problem the user can fix: a one-line message naming the file or source and the fix."""
