"""Errors a user can act on.

Every error here carries a message that names the thing at fault (a path, an array, a
field) and what is wrong with it. The CLI prints these without a traceback, and so it
does the errors of the environment a user sets up (`user_error_message`: a path that is
missing or not writable, a store or registry out of reach, no credentials); anything
else is a bug and keeps its traceback.

Messages name what a user gave or an archive holds, so they are printed through
`printable`: an instrument file's tag or a catalog's image id can hold any text.
"""

import re

# C0 controls but tab, DEL and C1 controls. ESC (\x1b) starts a terminal's escape
# sequences: OSC 52 writes the clipboard, OSC 0 the window title, CSI moves the cursor and
# erases lines; a terminal that reads C1 takes U+009B for ESC [. CR and backspace
# overwrite what was printed.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: object, *, newlines: bool = False) -> str:
    """`str(text)` with each control character written as its visible escape (ESC as the
    four characters \\x1b, a line break as \\n unless `newlines` keeps line breaks, as a
    multi-line error message needs), safe to print to a terminal."""
    control = _CONTROL_BUT_NEWLINE if newlines else _CONTROL
    return control.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


class GrainflowError(Exception):
    """Base class of errors caused by input, configuration or environment."""

    def __reduce__(self):
        # Ray carries a worker's error to the driver pickled. Exception's own reduce
        # calls cls(*args) with args = (message,), which fails for the subclasses whose
        # __init__ takes other arguments (CorruptChunkError, ChecksumMismatchError, ...)
        # and leaves the driver an unpickling error instead of this one.
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type, args: tuple, state: dict) -> GrainflowError:
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


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


def remote_cause(exc: BaseException) -> BaseException:
    """The error that names the fault for `exc` raised through Ray. A Ray task's or
    actor's error arrives as Ray's RayTaskError (still an instance of the original
    class) with the original in `cause`; a Ray Train run's as a WorkerGroupError
    (`trainer.fit()`) with each failed worker's error in `worker_failures`
    {world rank: error}: the lowest rank's GrainflowError, else the lowest rank's
    error. Followed through nested wrappers; anything else is returned as it is."""
    for _ in range(8):  # wrappers nest a few deep at most (a Ray Data task in a worker)
        cause = getattr(exc, "cause", None)
        failures = getattr(exc, "worker_failures", None)
        if isinstance(cause, BaseException) and cause is not exc:
            exc = cause
        elif isinstance(failures, dict) and failures:
            errors = [failures[rank] for rank in sorted(failures)]
            ours = [e for e in errors if isinstance(remote_cause(e), GrainflowError)]
            exc = (ours or errors)[0]
        else:
            break
    return exc


def error_message(exc: BaseException) -> str:
    """The text to show a user for `exc`: for an error raised through Ray, whose text is
    the remote traceback, its `remote_cause`'s own message, which names the fault."""
    return str(remote_cause(exc))


# Errors of the environment rather than of grainflow, by the module their class lives in
# (no import of the libraries needed): S3 credentials and endpoints, the MLflow registry.
_ENVIRONMENT_MODULES = ("botocore.", "aiobotocore.", "mlflow.exceptions")
_HINTS = {
    "NoCredentialsError": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or ~/.aws, or [s3] in $GRAINFLOW_CONFIG)",
    "EndpointConnectionError": "check the S3 endpoint (AWS_ENDPOINT_URL or [s3] endpoint_url in $GRAINFLOW_CONFIG)",
}


def user_error_message(exc: BaseException) -> str | None:
    """The one line to show a user for `exc` when it is theirs to act on: a
    GrainflowError's message, or, for an error of their environment (an OSError: a path
    missing, not writable or a directory, a connection refused; an S3 or MLflow client
    error), its type and text with a hint where one helps. None: a bug, whose traceback
    should be seen, as it is for every error but a GrainflowError when GRAINFLOW_DEBUG
    is set (an OSError can be a bug too). Errors raised in Ray tasks and Ray Train
    workers are judged by their `remote_cause`."""
    import os

    exc = remote_cause(exc)
    if isinstance(exc, GrainflowError):
        return str(exc)
    environment = isinstance(exc, OSError) or any(
        c.__module__.startswith(_ENVIRONMENT_MODULES) for c in type(exc).__mro__)
    if not environment or os.environ.get("GRAINFLOW_DEBUG"):
        return None
    name = type(exc).__name__
    hint = _HINTS.get(name)
    return f"{name}: {exc}" + (f" ({hint})" if hint else "") + " [GRAINFLOW_DEBUG=1 shows the traceback]"


def exit_code_for(exc: BaseException, prog: str) -> int:
    """For a job's main, inside its `except Exception as exc:`: print `prog: <one line>`
    (`printable`) to stderr and return exit code 2 when `exc` is the user's to act on
    (`user_error_message`); re-raise it, traceback and all, when it is a bug."""
    import sys

    message = user_error_message(exc)
    if message is None:
        raise  # the exception being handled: called only from an except block
    print(f"{prog}: {printable(message, newlines=True)}", file=sys.stderr)
    return 2
