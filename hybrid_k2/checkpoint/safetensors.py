"""Minimal safetensors reader: validated header, read-only mmap, zero-copy tensor views.

Format: u64 little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
then the data section; offsets are relative to the start of the data section.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys
import warnings

import numpy as np
import torch

from . import CheckpointError, mapped

# safetensors dtype string -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
DTYPE_NAMES = {td: name for name, (td, _) in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # the reference implementation's limit


class SafetensorsFile:
    """One .safetensors file mapped read-only. `view()` tensors alias the mapping: do not write to them."""

    def __init__(self, path: str | os.PathLike):
        if sys.byteorder != "little":
            raise CheckpointError(f"{path}: safetensors data is little-endian; this host is not")
        self.path = os.fspath(path)
        self._mmap, self._mapped = None, None
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file ({size} bytes, no header length)")
                (n,) = struct.unpack("<Q", f.read(8))
                if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                    raise CheckpointError(
                        f"{self.path}: corrupt safetensors header length {n} (file has {size} bytes)")
                raw = f.read(n)
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read safetensors file: {e}") from e
        self._size = size
        self._mapped = mapped.register(self.path, size)
        self._data_start = 8 + n
        try:
            header = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:   # bad UTF-8 or JSON, ints past 4300 digits, deep nesting
            self.close()
            raise CheckpointError(f"{self.path}: safetensors header is not valid JSON: {e}") from e
        try:
            self._parse(header, size - self._data_start)
        except CheckpointError:
            self.close()
            raise

    def _parse(self, header, data_len: int) -> None:
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise CheckpointError(f"{self.path}: __metadata__ is not a JSON object of strings")
        self.metadata: dict[str, str] = meta
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        spans = []
        for name, e in header.items():
            where = f"{self.path}: tensor {name!r}"
            if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
                raise CheckpointError(f"{where}: header entry needs dtype, shape and data_offsets, got {e!r}")
            dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
            if dtype not in DTYPES:
                raise CheckpointError(f"{where}: unsupported dtype {dtype!r}")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise CheckpointError(f"{where}: bad shape {shape!r}")
            if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                    or not 0 <= offs[0] <= offs[1]):
                raise CheckpointError(f"{where}: bad data_offsets {offs!r}")
            nbytes = math.prod(shape) * DTYPES[dtype][1]
            if offs[1] - offs[0] != nbytes:
                raise CheckpointError(
                    f"{where}: data_offsets {offs} span {offs[1] - offs[0]} bytes but {dtype}{shape} needs {nbytes}")
            if offs[1] > data_len:
                raise CheckpointError(
                    f"{where}: data ends at byte {offs[1]} but the data section has {data_len} bytes (file truncated?)")
            self._entries[name] = (dtype, tuple(shape), offs[0], offs[1])
            if nbytes:
                spans.append((offs[0], offs[1], name))
        # As the reference reader (safetensors' Metadata::validate) requires: the tensors tile the data section
        # exactly, in offset order from byte 0 to its end. A header length off by a byte, an entry pointing
        # into another tensor or a retyped entry therefore cannot shift or alias data silently.
        spans.sort()
        end, prev = 0, None
        for begin, stop, name in spans:
            if begin != end:
                what = f"overlap in the data section" if begin < end else \
                    f"leave bytes {end}..{begin} of the data section unclaimed (gap)"
                first = f"tensors {prev!r} and {name!r}" if prev is not None else f"the data section start and {name!r}"
                raise CheckpointError(f"{self.path}: {first} {what}")
            end, prev = stop, name
        if end != data_len:
            raise CheckpointError(
                f"{self.path}: the tensors end at byte {end} of the data section but it has {data_len} bytes "
                f"(header length {self._data_start - 8} is wrong, or bytes were appended)")

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r}") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        dtype, shape, _, _ = self._entry(name)
        return dtype, shape

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._entry(name)
        return end - begin

    def view(self, name: str) -> torch.Tensor:
        """Zero-copy, read-only tensor over the mapped bytes (a copy only if empty or misaligned)."""
        dtype, shape, begin, end = self._entry(name)
        tdtype, size = DTYPES[dtype]
        if self._mmap is None:
            raise CheckpointError(f"{self.path}: file is closed (reading {name!r})")
        mapped.check_size(self.path, self._mmap, self._size, f"tensor {name!r}")
        offset = self._data_start + begin
        if end == begin:
            return torch.empty(shape, dtype=tdtype)
        # via numpy: its array holds a buffer export on the mmap, so the mapping cannot be unmapped
        # (close() gets BufferError) while any view is alive; torch.frombuffer holds none.
        arr = np.frombuffer(self._mmap, dtype=np.uint8, count=end - begin, offset=offset)
        with warnings.catch_warnings():  # torch warns that the mapping is not writable; that is intended
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(arr)
        if offset % size:  # unaligned typed access: copy (the writers we know never do this)
            raw = raw.clone()
        return raw.view(tdtype).reshape(shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's RSS (they stay in the page cache); views stay valid."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, begin, end = self._entry(name)
        start = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = self._data_start + end
        if stop > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self) -> None:
        mm, self._mmap = getattr(self, "_mmap", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # views still alive: the mapping goes when the last one does (and stays named)
                return
        mapped.unregister(getattr(self, "_mapped", None))
        self._mapped = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self._entries)} tensors)"
