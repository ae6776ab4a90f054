"""Exceptions raised by `locality.data`. Every message names the bad value and the fix."""

from __future__ import annotations


class DataSourceError(RuntimeError):
    """The raw files of a dataset are missing and cannot be obtained here.

    The message says which command obtains them and what to do on other machines.
    """


class ChecksumError(DataSourceError):
    """A raw file's sha256 differs from the pinned value (corrupt or wrong file)."""


class CorruptDataError(ValueError):
    """A raw file has the right name but cannot be decoded (bad header, size or values)."""
