"""Every error the project raises on purpose, in one place; each ends a run with one line instead of a traceback
(contentv_common.cli maps them to exit statuses: bad input 2, a stopped run 1)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is unknown, missing, of the wrong type or impossible; the message names the key."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or does not match the model; the message names file/key/shapes."""


class UnknownParameterError(KeyError):
    """A parameter name matches no rule of its table."""


class DataError(ValueError):
    """The training data cannot make a batch (missing manifest, no usable video, too few samples); names the file."""


class ManifestError(DataError):
    """A manifest line is not valid; the message names the file, the line and the key."""


class ClipError(Exception):
    """A source cannot give the requested clip; `reason` is the counted category."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class RunLockedError(RuntimeError):
    """Another live process holds the checkpoint dir."""


class RunStopped(RuntimeError):
    """A run stopped for a stated reason (divergence, a checkpoint that could not be written); exit status 1."""


class CheckpointSaveError(RunStopped):
    """Writing a checkpoint failed (read-only or full disk, ...); the previous checkpoint stays the resume point."""


class TrainingStopped(RunStopped):
    """Too many skipped steps: the run stops; the last checkpoint from before the first bad step is its resume point."""
