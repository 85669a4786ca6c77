"""llamacpu: LLaMA-family language models on a laptop CPU, from Python.

    from llamacpu import Llama
    with Llama("model.bin") as llm:
        print(llm("Once upon a time", max_tokens=32)["choices"][0]["text"])
"""

from .errors import (BusyError, CheckpointError, ClosedError, LlamaCPUError, ModelFileError,
                     ModelNotFoundError, UnsafeCheckpointError, UsageError)

__version__ = "0.1.0"

__all__ = ["Llama", "LlamaCPUError", "ModelFileError", "CheckpointError", "UnsafeCheckpointError",
           "UsageError", "ModelNotFoundError", "ClosedError", "BusyError", "__version__"]


def __getattr__(name):
    # Lazy, so that the converter and the error types import without loading the kernels.
    if name == "Llama":
        from .llama import Llama

        return Llama
    raise AttributeError(f"module 'llamacpu' has no attribute {name!r}")
