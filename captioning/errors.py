"""Captioning errors a user can act on; each message names the fix.

They subclass :class:`trainer.errors.UserError`, so ``python -m trainer caption``
and the web app print them on one line instead of a traceback.
"""

from trainer.errors import ModelNotFoundError, UserError


class UnknownCaptioner(UserError):
    """The captioner name is not in the registry; the message lists the names that are."""


class CaptionerUnavailable(ModelNotFoundError):
    """A captioner's weights or runtime package are missing; the message says which and how to get them.

    ``summary`` is a few words ("Salesforce/blip-image-captioning-base not cached")
    for lists such as the ``auto`` fallback reason.
    """

    def __init__(self, message: str, summary: str = ""):
        super().__init__(message)
        self.summary = summary or message


class CaptionFileError(UserError):
    """An existing caption file cannot be read (for example it is not UTF-8); that image is skipped."""
