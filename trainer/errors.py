"""Exceptions a user can act on.

Every error here carries a message that says what went wrong *and* what to do.
The CLI prints ``str(err)`` on one line and exits 2; the web app shows the same
line. Anything that is not a :class:`UserError` is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Base class: bad input or a missing resource the user can fix."""

    label = "error"  # how the CLI starts its one line
    exit_code = 2  # what the CLI exits with


class ConfigError(UserError):
    """One or more config values are invalid (all problems are listed at once)."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("invalid config: " + "; ".join(self.problems))


class DataError(UserError):
    """The training data folder cannot be used (empty, no readable images, ...)."""


class ImageError(UserError):
    """One image file cannot be used; the reason says why (the file is skipped)."""


class ModelNotFoundError(UserError):
    """A base model or weight file is missing; the message says what to download and where."""


class UnsupportedError(UserError):
    """The request is valid but this machine or build cannot do it (e.g. NF4 without bitsandbytes)."""


class LoraFormatError(UserError):
    """A LoRA file is not in a format we can read, or does not fit the base model."""


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class WriteError(UserError):
    """A file could not be written (disk full, read-only folder); nothing half-written was left behind."""
