"""Errors raised by the data package (spec §1.2; DESIGN "Errors are for people")."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data file is missing or malformed.

    The message always names the file or folder concerned and says what is wrong (or, for a missing dataset,
    every place that was searched and which files to put there).
    """
