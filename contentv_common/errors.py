"""Errors that end a run with one line instead of a traceback (contentv_common.cli maps them to exit statuses)."""

from __future__ import annotations


class DataError(ValueError):
    """The training data cannot make a batch (missing manifest, no usable video, too few samples); names the file."""


class RunStopped(RuntimeError):
    """A run stopped for a stated reason (divergence, a checkpoint that could not be written); exit status 1."""


class CheckpointSaveError(RunStopped):
    """Writing a checkpoint failed (read-only or full disk, ...); the previous checkpoint stays the resume point."""
