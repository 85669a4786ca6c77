"""The converter's checkpoint readers: source checkpoints in, canonical lazy tensors out.

Nothing here imports torch, and no code from a pickle ever runs.
"""

from .checkpoint import Checkpoint, canonical_names, open_checkpoint
from .safetensors import read_safetensors
from .tensor import (ConcatTensor, FileTensor, LazyTensor, RowPermutedTensor, TensorFile,
                     UnsupportedTensor, unrotate_half_perm)
from .torchzip import read_torch_zip
from .writer import DTYPE_CHOICES, convert_checkpoint


def open_source(path):
    """Opens what `llamacpu convert` was given: a checkpoint folder."""
    return open_checkpoint(path)


__all__ = [
    "Checkpoint", "open_checkpoint", "canonical_names", "read_safetensors", "read_torch_zip",
    "LazyTensor", "FileTensor", "ConcatTensor", "RowPermutedTensor", "UnsupportedTensor",
    "TensorFile", "unrotate_half_perm", "open_source", "convert_checkpoint", "DTYPE_CHOICES",
]
