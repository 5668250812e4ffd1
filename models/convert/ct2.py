"""Reader for CTranslate2 `model.bin` files (binary spec version 6), without CTranslate2 itself.

Layout (little endian): u32 binary version, string model name, u32 spec revision, u32 variable
count, then per variable: string name, u8 rank, u32 dims[rank], u8 dtype, u32 byte count, data;
then u32 alias count and (alias, target) string pairs. A string is a u16 length (including its
trailing NUL) followed by the bytes.
"""
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
SUPPORTED_VERSION = 6


@dataclass
class Ct2Model:
    name: str
    revision: int
    variables: dict = field(default_factory=dict)

    def __getitem__(self, key):
        return self.variables[key]

    def __contains__(self, key):
        return key in self.variables

    def scalar(self, key):
        return int(self.variables[key])

    def count_layers(self, prefix):
        """Number of `<prefix>/layer_<i>/...` blocks."""
        i = 0
        while any(k.startswith(f"{prefix}/layer_{i}/") for k in self.variables):
            i += 1
        return i


class _Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def unpack(self, fmt):
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self):
        n = self.unpack("H")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.rstrip(b"\0").decode()

    def array(self, shape, dtype, nbytes):
        arr = np.frombuffer(self.data, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize, offset=self.pos)
        self.pos += nbytes
        return arr.reshape(shape)

    def at_end(self):
        return self.pos >= len(self.data)


def read(path):
    """Reads a CTranslate2 model.bin; aliases (e.g. a tied output projection) resolve to their target."""
    r = _Reader(Path(path).read_bytes())
    version = r.unpack("I")
    if version != SUPPORTED_VERSION:
        raise ValueError(f"{path}: CTranslate2 binary version {version}, this reader supports {SUPPORTED_VERSION}")
    model = Ct2Model(name=r.string(), revision=r.unpack("I"))
    for _ in range(r.unpack("I")):
        name = r.string()
        rank = r.unpack("B")
        shape = [r.unpack("I") for _ in range(rank)]
        dtype = r.unpack("B")
        nbytes = r.unpack("I")
        if dtype not in DTYPES:
            raise ValueError(f"{path}: variable {name} has unknown dtype code {dtype}")
        model.variables[name] = r.array(shape, DTYPES[dtype], nbytes)
    if not r.at_end():
        for _ in range(r.unpack("I")):
            alias, target = r.string(), r.string()
            model.variables[alias] = model.variables[target]
    return model
