"""Reading ``.safetensors`` files with our own parser (no ``safetensors`` package at runtime).

Layout: an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data section
that follows the header), then the data, always little-endian.
"""

from __future__ import annotations

import json
import struct

from llamacpu.errors import CheckpointError

from .tensor import ITEMSIZE, FileTensor, SourceFile, TensorFile, UnsupportedTensor

MAX_HEADER_BYTES = 100 << 20

_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
# Item sizes of the types we cannot convert, so their offsets are still checked.
_OTHER_ITEMSIZE = {
    "F64": 8, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


def read_safetensors(path) -> TensorFile:
    """Open a .safetensors file; return its tensors by name."""
    path = str(path)
    try:
        source = SourceFile(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
    try:
        return TensorFile(path, _parse(path, source), source)
    except BaseException:
        source.close()
        raise


def _parse(path: str, source: SourceFile) -> dict:
    if source.size < 8:
        raise CheckpointError(f"{path}: too short for a safetensors file ({source.size} bytes)")
    (hlen,) = struct.unpack("<Q", source.read(0, 8).tobytes())
    if hlen > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: safetensors header of {hlen} bytes is over the "
                              f"{MAX_HEADER_BYTES >> 20} MiB limit (not a safetensors file?)")
    if 8 + hlen > source.size:
        raise CheckpointError(f"{path}: safetensors header runs past the end of the file "
                              "(truncated?)")
    try:
        header = json.loads(source.read(8, hlen).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + hlen
    data_len = source.size - data_start
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _entry(path, source, name, entry, data_start, data_len)
    return tensors


def _entry(path, source, name, entry, data_start, data_len):
    def bad(msg):
        raise CheckpointError(f"{path}: tensor {name}: {msg}")

    if not isinstance(entry, dict):
        bad("header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        bad(f"bad dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_nonneg_int(d) for d in shape):
        bad(f"bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_nonneg_int(o) for o in offsets)):
        bad(f"bad data_offsets {offsets!r}")
    begin, end = offsets
    if not begin <= end <= data_len:
        bad(f"data_offsets {offsets} lie outside the {data_len}-byte data section (truncated?)")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = ITEMSIZE.get(_DTYPES.get(dtype, ""), _OTHER_ITEMSIZE.get(dtype))
    if itemsize is not None and end - begin != numel * itemsize:
        bad(f"data_offsets {offsets} span {end - begin} bytes, but {dtype}{shape} needs "
            f"{numel * itemsize}")
    if dtype not in _DTYPES:
        return UnsupportedTensor(name, shape, dtype, path)
    return FileTensor(name, source, data_start + begin, shape, _DTYPES[dtype])


def _nonneg_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


__all__ = ["read_safetensors", "MAX_HEADER_BYTES"]
