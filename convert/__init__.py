"""The converter's checkpoint readers: source checkpoints in, canonical lazy tensors out.

Nothing here imports torch, and no code from a pickle ever runs.
"""

from pathlib import Path

from llamacpu.errors import CheckpointError

from .checkpoint import Checkpoint, canonical_names, open_checkpoint
from .gguf import MAGIC as GGUF_MAGIC, GGUFTensor, open_gguf, read_gguf
from .safetensors import read_safetensors
from .tensor import (ConcatTensor, FileTensor, LazyTensor, RowPermutedTensor, TensorFile,
                     UnsupportedTensor, unrotate_half_perm)
from .torchzip import read_torch_zip
from .writer import DTYPE_CHOICES, convert_checkpoint


def open_source(path):
    """Opens what `llamacpu convert` was given: a GGUF file or a checkpoint folder."""
    p = Path(path)
    if not p.is_file():
        return open_checkpoint(p)  # a folder, or the not-found error naming both layouts
    try:
        with open(p, "rb") as f:
            magic = f.read(8)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e})") from None
    if magic[:4] == GGUF_MAGIC:
        return open_gguf(p)
    if magic == b"LLAMACPU":
        raise CheckpointError(f"{p}: is already a llamacpu model file; nothing to convert")
    raise CheckpointError(f"{p}: not a GGUF file (no GGUF magic); expected a GGUF file or a "
                          "checkpoint folder (Meta or Hugging Face layout)")


__all__ = [
    "Checkpoint", "open_checkpoint", "canonical_names", "read_safetensors", "read_torch_zip",
    "LazyTensor", "FileTensor", "ConcatTensor", "RowPermutedTensor", "UnsupportedTensor",
    "TensorFile", "unrotate_half_perm", "open_source", "open_gguf", "read_gguf", "GGUFTensor",
    "convert_checkpoint", "DTYPE_CHOICES",
]
