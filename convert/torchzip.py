"""Reading ``torch.save`` zip archives without torch, and without running any pickled code.

The archive holds ``<prefix>/data.pkl`` (the pickled state dict), ``<prefix>/byteorder`` and
one ``<prefix>/data/<key>`` record per storage. The pickle is loaded by an unpickler that
knows a short allow-list of globals and hands back our own inert stand-ins for them, so a
hostile file is refused before anything it names is called.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import re
import struct
import zipfile

from llamacpu.errors import CheckpointError, LlamaCPUError, UnsafeCheckpointError

from .tensor import ITEMSIZE, FileTensor, LazyTensor, SourceFile, TensorFile, UnsupportedTensor

MAX_PICKLE_BYTES = 256 << 20

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_MAGIC = b"PK\x03\x04"

# torch's storage type names: our dtype tag and the item size in bytes.
_STORAGE_TYPES = {
    "FloatStorage": ("f32", 4),
    "HalfStorage": ("f16", 2),
    "BFloat16Storage": ("bf16", 2),
    "DoubleStorage": ("float64", 8),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
    "ComplexDoubleStorage": ("complex128", 16),
    "ComplexFloatStorage": ("complex64", 8),
    "QInt8Storage": ("qint8", 1),
    "QUInt8Storage": ("quint8", 1),
    "QInt32Storage": ("qint32", 4),
    "QUInt4x2Storage": ("quint4x2", 1),
    "QUInt2x4Storage": ("quint2x4", 1),
}

_DTYPE_NAMES = ("float32", "float16", "bfloat16")


class _Inert:
    """A stand-in the pickle gets instead of a torch object. Pickle's BUILD opcode would
    otherwise set any attributes on it (an itemsize of 0, a shape that is not a tuple)."""

    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"BUILD sets the state of {type(self).__name__}, which torch never does")


class _StorageType(_Inert):
    """Stand-in for ``torch.FloatStorage`` and friends: a marker, never called."""

    __slots__ = ("name", "dtype", "itemsize")

    def __init__(self, name: str):
        self.name = name
        self.dtype, self.itemsize = _STORAGE_TYPES.get(name, (name, None))

    def __repr__(self):
        return f"torch.{self.name}"


class _DType(_Inert):
    """Stand-in for ``torch.float32`` and friends, should a pickle mention one."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"torch.{self.name}"


class _StorageRef(_Inert):
    """A storage record of the archive: where its bytes are and what they are."""

    __slots__ = ("stype", "key", "offset", "numel")

    def __init__(self, stype: _StorageType, key: str, offset: int, numel: int):
        self.stype = stype
        self.key = key
        self.offset = offset
        self.numel = numel


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: "_Archive"):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._storages: dict = {}

    def find_class(self, module, name):
        allowed = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        # Storage types and dtypes are only markers: their stand-ins cannot be called.
        if module == "torch" and re.fullmatch(r"[A-Z][A-Za-z0-9_]*Storage", name or ""):
            return _StorageType(name)
        if module == "torch" and name in _DTYPE_NAMES:
            return _DType(name)
        raise UnsafeCheckpointError(
            f"{self._archive.path}: refuses pickle global {module}.{name} (not a tensor or state "
            "dict type); nothing from the file was run")

    def persistent_load(self, pid):
        path = self._archive.path
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{path}: unsupported persistent id in data.pkl: {_short(pid)}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not _is_int(numel) \
                or numel < 0:
            raise CheckpointError(f"{path}: malformed storage reference in data.pkl: {_short(pid)}")
        ref = self._storages.get(key)
        if ref is not None:
            if ref.stype.name != stype.name or ref.numel != numel:
                raise CheckpointError(f"{path}: storage {key} is referenced with two types or sizes")
            return ref
        offset, size = self._archive.record(f"data/{key}")
        if stype.itemsize is not None and size < numel * stype.itemsize:
            raise CheckpointError(
                f"{path}: storage record data/{key} holds {size} bytes, less than the "
                f"{numel} x {stype.itemsize} its {stype.name} needs")
        ref = self._storages[key] = _StorageRef(stype, key, offset, numel)
        return ref

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        path = self._archive.path
        if not isinstance(storage, _StorageRef):
            raise CheckpointError(f"{path}: a tensor in data.pkl has no storage record")
        if not (_is_int(storage_offset) and _is_int_tuple(size) and _is_int_tuple(stride)):
            raise CheckpointError(f"{path}: malformed tensor in data.pkl (offset "
                                  f"{_short(storage_offset)}, size {_short(size)}, stride {_short(stride)})")
        return _TensorSpec(storage, storage_offset, tuple(size), tuple(stride))

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None):
        return self._rebuild_tensor(storage, storage_offset, size, stride)

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None, state=None):
        if not isinstance(data, _TensorSpec):
            raise CheckpointError(f"{self._archive.path}: a parameter in data.pkl holds no tensor")
        return data


class _TensorSpec(_Inert):
    """What _rebuild_tensor_v2 was asked to build; it becomes a LazyTensor once it has a name."""

    __slots__ = ("storage", "storage_offset", "size", "stride")

    def __init__(self, storage: _StorageRef, storage_offset: int, size: tuple, stride: tuple):
        self.storage = storage
        self.storage_offset = storage_offset
        self.size = size
        self.stride = stride

    def build(self, name: str, archive: "_Archive") -> LazyTensor:
        st = self.storage
        if st.stype.dtype not in ITEMSIZE:
            return UnsupportedTensor(name, self.size, st.stype.dtype, archive.path)
        return FileTensor(name, archive.source, st.offset, self.size, st.stype.dtype,
                          storage_numel=st.numel, storage_offset=self.storage_offset,
                          strides=self.stride, big_endian=archive.big_endian)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_int_tuple(v) -> bool:
    return isinstance(v, (tuple, list)) and len(v) <= 8 and all(_is_int(x) for x in v)


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


class _Archive:
    """The central directory of a torch zip and positional access to its stored records."""

    def __init__(self, path: str, source: SourceFile):
        self.path = path
        self.source = source
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
                pkl = [i for i in infos if re.fullmatch(r"[^/]+/data\.pkl", i.filename)]
                if len(pkl) != 1:
                    raise CheckpointError(f"{path}: not a torch.save archive (no single "
                                          "<name>/data.pkl record)")
                self.prefix = pkl[0].filename[: -len("data.pkl")]
                if pkl[0].file_size > MAX_PICKLE_BYTES:
                    raise CheckpointError(f"{path}: data.pkl is {pkl[0].file_size} bytes, over the "
                                          f"{MAX_PICKLE_BYTES >> 20} MiB limit")
                self.pickle = zf.read(pkl[0])
                self._infos = {i.filename: i for i in infos}
                self.big_endian = self._byteorder(zf)
        except Exception as e:  # BadZipFile, zlib.error (a damaged compressed record), EOFError, ...
            if isinstance(e, LlamaCPUError):
                raise
            raise CheckpointError(f"{path}: damaged or truncated zip archive ({e})") from None

    def _byteorder(self, zf: zipfile.ZipFile) -> bool:
        info = self._infos.get(self.prefix + "byteorder")
        if info is None:
            return False  # written before torch recorded it; those were little-endian hosts
        order = zf.read(info)[:16]
        if order not in (b"little", b"big"):
            raise CheckpointError(f"{self.path}: unknown byteorder record {order!r}")
        return order == b"big"

    def record(self, name: str) -> tuple:
        """(data offset, size) of a stored record under the prefix."""
        info = self._infos.get(self.prefix + name)
        if info is None:
            raise CheckpointError(f"{self.path}: data.pkl names record {name}, which the archive lacks")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{self.path}: record {name} is compressed; tensors must be stored uncompressed "
                "as torch.save writes them (re-save the checkpoint with torch.save)")
        # The data begins after the *local* header, whose extra field (torch pads it for
        # alignment) may differ from the central directory's copy.
        header = self.source.read(info.header_offset, _LOCAL_HEADER.size).tobytes()
        fields = _LOCAL_HEADER.unpack(header)
        if fields[0] != _LOCAL_MAGIC:
            raise CheckpointError(f"{self.path}: record {name} has a bad local header")
        name_len, extra_len = fields[9], fields[10]
        offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if offset + info.file_size > self.source.size:
            raise CheckpointError(f"{self.path}: record {name} runs past the end of the file "
                                  "(truncated?)")
        return offset, info.file_size


def read_torch_zip(path) -> TensorFile:
    """Open a torch.save archive; return its tensors (a flat state dict) by name.

    Non-tensor entries are dropped; a state dict nested as {"model": sd} or
    {"state_dict": sd} is unwrapped.
    """
    path = str(path)
    try:
        source = SourceFile(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
    try:
        _check_magic(path, source)
        archive = _Archive(path, source)
        obj = _unpickle(archive)
        return TensorFile(path, _state_dict(archive, obj), source)
    except BaseException:
        source.close()
        raise


def _check_magic(path: str, source: SourceFile) -> None:
    head = source.read(0, min(4, source.size)).tobytes()
    if head == _LOCAL_MAGIC:
        return
    if head[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: legacy (pre-1.6, non-zip) torch format is not supported; re-save it with "
            "torch.save from a current torch")
    raise CheckpointError(f"{path}: not a torch.save zip archive")


def _check_memo(archive: _Archive) -> None:
    """Refuses memo indices no pickler writes. The unpickler grows its memo table to the
    largest index it sees, so one LONG_BINPUT of 2**28 in a 50-byte pickle would take 4 GB."""
    try:
        for i, (op, arg, _) in enumerate(pickletools.genops(archive.pickle)):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= arg <= i:
                raise CheckpointError(f"{archive.path}: data.pkl uses memo index {arg} at its opcode {i}; "
                                      "a pickler numbers them from 0 (damaged or hostile file)")
    except CheckpointError:
        raise
    except Exception:  # malformed from here on: the unpickler stops at the same place, and says why
        return


def _unpickle(archive: _Archive):
    try:
        _check_memo(archive)
        return _SafeUnpickler(archive.pickle, archive).load()
    except LlamaCPUError:
        raise
    except RecursionError:
        raise CheckpointError(f"{archive.path}: data.pkl is nested too deeply") from None
    except Exception as e:  # any malformed pickle: UnpicklingError, TypeError, EOFError, ...
        raise CheckpointError(f"{archive.path}: cannot read data.pkl "
                              f"({type(e).__name__}: {_short(str(e))})") from None


def _state_dict(archive: _Archive, obj) -> dict:
    path = archive.path
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: data.pkl holds a {type(obj).__name__}, not a state dict")
    if not any(isinstance(v, _TensorSpec) for v in obj.values()):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    tensors: dict = {}
    for key, value in obj.items():
        if not isinstance(value, _TensorSpec):
            continue  # optimizer steps, epochs and the like
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: state dict key {_short(key)} is not a string")
        tensors[key] = value.build(key, archive)
    return tensors


__all__ = ["read_torch_zip", "MAX_PICKLE_BYTES"]
