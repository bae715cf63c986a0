"""Errors a user can act on.

Every error here carries a message that names the thing at fault (a path, an array, a
field) and what is wrong with it. The CLI prints these without a traceback; anything
else is a bug and keeps its traceback.
"""


class GrainflowError(Exception):
    """Base class of errors caused by input, configuration or environment."""


class InvalidURIError(GrainflowError, ValueError):
    """A URI with an unknown scheme, a malformed form, or one that escapes its root."""


class MetadataError(GrainflowError):
    """OME-Zarr or instrument metadata that is missing or does not follow the spec."""


class CorruptChunkError(GrainflowError):
    """A stored chunk that cannot be decoded. `chunk_keys` names the store keys at fault."""

    def __init__(self, message: str, *, array_uri: str, chunk_keys: tuple[str, ...]):
        super().__init__(message)
        self.array_uri = array_uri
        self.chunk_keys = chunk_keys


class UnsupportedDtypeError(GrainflowError, TypeError):
    """Pixel data whose dtype grainflow does not handle."""


class IngestError(GrainflowError):
    """An instrument file that cannot be converted (unreadable, no pixel size, ...)."""


class UnknownNameError(GrainflowError, ValueError):
    """A name (material, modality, model config, ...) that is not registered; the message lists the valid ones."""


def error_message(exc: BaseException) -> str:
    """The text to show a user for `exc`. An error raised inside a Ray task or actor
    arrives as Ray's RayTaskError (still an instance of the original class), whose text
    is the remote traceback: its `cause`'s own message is what names the fault."""
    cause = getattr(exc, "cause", None)
    return str(cause if isinstance(cause, BaseException) else exc)
