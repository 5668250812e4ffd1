"""Reads a legacy (pre-1.6, non-zip) `torch.save` file into numpy arrays, without torch.

Layout of such a file: four pickles (magic number, protocol version, system info, the saved
object) and then a pickled list of storage keys, each followed by its raw data: an int64 element
count and that many little-endian elements. Tensors inside the saved object are persistent
references to those storages (`_rebuild_tensor_v2(storage, offset, size, stride, ...)`).
"""
import collections
import pickle
import struct
from pathlib import Path

import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C

STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Storage:
    """A typed storage whose bytes are read after the object pickle."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.data = None


class _TensorRef:
    """A strided view into a storage, materialised once every storage has been read."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def array(self):
        item = self.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            self.storage.data[self.offset :], shape=self.size, strides=[s * item for s in self.stride]
        )
        return view.copy()


def _rebuild_tensor(storage, offset, size, stride, *_):
    return _TensorRef(storage, offset, size, stride)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.storages = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name.startswith("_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unsupported object in checkpoint: {module}.{name}")

    def persistent_load(self, pid):
        kind, storage_type, key = pid[:3]
        view = pid[5] if len(pid) > 5 else None
        if kind != "storage" or view is not None:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(STORAGE_DTYPES[storage_type])
        return self.storages[key]


def _materialise(obj):
    if isinstance(obj, _TensorRef):
        return obj.array()
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v) for v in obj)
    return obj


def load(path):
    """The object saved in a legacy torch checkpoint, with every tensor as a numpy array."""
    with open(Path(path), "rb") as f:
        if pickle.load(f) != MAGIC:
            raise ValueError(f"{path}: not a legacy torch checkpoint (zip checkpoints are not supported)")
        pickle.load(f)  # protocol version
        pickle.load(f)  # system info (byte order, type sizes)
        unpickler = _Unpickler(f)
        obj = unpickler.load()
        for key in pickle.load(f):
            storage = unpickler.storages[key]
            (count,) = struct.unpack("<q", f.read(8))
            storage.data = np.frombuffer(f.read(count * storage.dtype.itemsize), dtype=storage.dtype)
    return _materialise(obj)
