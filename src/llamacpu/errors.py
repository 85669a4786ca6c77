"""The package's exception types.

Every error a user can cause (a bad path, a damaged file, a refused checkpoint, a wrong
option) is raised as one of these, with a message that reads well as a single line. The
command line prints ``str(error)`` and exits non-zero; it never shows a traceback.
"""


# Line breaks and other control characters, as they would be written in a Python string:
# messages quote names read from files (GGUF keys, tensor names), which may hold anything.
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(32), 0x7F, 0x85]}
_ESCAPES.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


class LlamaCPUError(Exception):
    """Base class of every error raised on purpose by llamacpu. Its message is always one
    line: control characters in it are escaped."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (args[0].translate(_ESCAPES),)
        super().__init__(*args)


class ModelFileError(LlamaCPUError, ValueError):
    """A model file (llamacpu's own or GGUF) is damaged, truncated or not a model file."""


class CheckpointError(LlamaCPUError, ValueError):
    """A source checkpoint cannot be converted: missing files, bad JSON, shape mismatches."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle inside a checkpoint asks for something outside the allow-list; nothing ran."""


class UsageError(LlamaCPUError, ValueError):
    """An argument or option has a value that cannot be used."""


class ModelNotFoundError(LlamaCPUError, OSError):
    """A path that should name a model or checkpoint does not exist or cannot be read."""


class ClosedError(LlamaCPUError, ValueError):
    """A Llama object was used after close()."""


class BusyError(LlamaCPUError, RuntimeError):
    """A Llama object was called from a second thread while a call was in progress."""
