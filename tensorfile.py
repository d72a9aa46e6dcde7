"""safetensors files, written and read with NumPy and json only (checkpoint.save and
checkpoint.load build on these; so do training's checkpoints).

Layout: 8-byte little-endian header length N, N bytes of JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
then the raw little-endian buffers. No code inside, so loading runs nothing.
"""
import json
import math
import os

from runtime import atomic_write
import numpy as np



class CheckpointError(ValueError):
    pass


DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
          "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
          "I8": np.dtype("i1")}
DTYPE_NAMES = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16",
               np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("<u2"): "U16", np.dtype("u1"): "U8",
               np.dtype("i1"): "I8"}
MAX_HEADER = 32 << 20   # a header's bytes: a Chimera's names and shapes, its config and a tokenizer
                        # of 2**21 tokens fit; parsing one costs ~15x its size
MAX_TENSORS = 1 << 16   # a 1,024-layer Chimera has ~10,000


def shape_mismatch(expected, shapes):
    """What is wrong with tensors of these name -> shape where `expected` name -> shape
    are wanted, in one line, or "" when they fit."""
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    wrong = [f"{n}: expected {tuple(expected[n])}, got {tuple(shapes[n])}"
             for n in sorted(set(expected) & set(shapes)) if tuple(shapes[n]) != tuple(expected[n])]
    parts = [f"{what} {len(names)}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
             for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
    return " | ".join(parts + ([f"wrong shape: {'; '.join(wrong[:8])}"] if wrong else []))


def bf16_bits(x):
    """float -> bfloat16 bit patterns (uint16): the top half of the float32, rounded to
    nearest with ties to even (add 0x7FFF plus the lowest kept bit, then truncate); NaN
    stays a (quiet) NaN instead of rounding into the exponent."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(bits.view(np.float32)), ((bits >> 16) | 0x40).astype(np.uint16), rounded)


def write_safetensors(path, tensors, metadata=None, bf16=False):
    """Write name -> array as a safetensors file (atomically: runtime.atomic_write);
    bf16=True stores every float tensor as BF16, half the bytes of float32."""
    header, offset = {}, 0
    arrays = {}
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        label = "BF16" if bf16 and arr.dtype.kind == "f" else DTYPE_NAMES.get(arr.dtype)
        if label is None:
            raise CheckpointError(f"{path}: cannot store {name} of dtype {arr.dtype}")
        if label == "BF16":
            arr = bf16_bits(arr)
        header[name] = {"dtype": label, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        arrays[name] = arr
        offset += arr.nbytes
    if metadata:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise CheckpointError(f"{path}: metadata must map strings to strings; bad keys {bad}")
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # pad so the buffers start 8-byte aligned
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for arr in arrays.values():
            f.write(memoryview(arr.reshape(-1)).cast("B"))


class SafetensorsFile:
    """An open safetensors file whose whole header has been validated against the
    file's size; tensors are read on demand, whole or a range of rows at a time."""

    def __init__(self, path):
        self.path = path
        try:
            size = os.path.getsize(path)
            self.f = open(path, "rb")
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open checkpoint ({e.strerror})") from None
        try:
            self._read_header(size)
        except BaseException:
            self.f.close()
            raise

    def _bad(self, msg):
        return CheckpointError(f"{self.path}: {msg}")

    def _read_header(self, size):
        f, bad = self.f, self._bad
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"not a safetensors file: only {size} bytes, the 8-byte header length is missing")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER):
            if head[:2] == b"PK" or head[:1] == b"\x80":  # zip or pickle magic, not a plausible length
                raise bad("this is a PyTorch .pt/.bin checkpoint (zip or pickle), not safetensors; "
                          "Wyrd never unpickles. Convert it with safetensors.torch.save_file")
            if n <= size - 8:
                raise bad(f"header of {n:,} bytes; expected at most {MAX_HEADER:,}")
            raise bad(f"not a safetensors file or truncated: header length {n} exceeds the file's {size - 8} bytes")
        raw = f.read(n)
        if raw.count(b'"data_offsets"') > MAX_TENSORS:  # counted before parsing: each would cost ~1 KB
            raise bad(f"corrupted header: more than {MAX_TENSORS:,} tensors")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a 4,300-digit integer; nested too deep
            raise bad(f"corrupted header: not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise bad("corrupted header: expected a JSON object")
        metadata = header.pop("__metadata__", {}) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise bad("corrupted header: __metadata__ must map strings to strings")
        data_len = size - 8 - n
        spans = []
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: an offset of 1e400
                raise bad(f"corrupted header entry {name!r}: expected dtype in {sorted(DTYPES)}, "
                          f"shape and data_offsets, got {info!r}") from None
            if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len:
                raise bad(f"tensor {name!r}: offsets [{begin}, {end}] fall outside the {data_len}-byte data "
                          f"section (file truncated?)")
            if end - begin != math.prod(shape) * dtype.itemsize:  # Python ints: no overflow
                raise bad(f"tensor {name!r}: {end - begin} bytes do not hold shape {list(shape)} of {info['dtype']}")
            spans.append((begin, end, name, dtype, shape, info["dtype"]))
        spans.sort()
        for (b0, e0, n0, *_), (b1, e1, n1, *_) in zip(spans, spans[1:]):
            if b1 < e0:
                raise bad(f"tensors {n0!r} and {n1!r} overlap in the data section")
        self.metadata = metadata
        # name -> (offset in the file, dtype, shape, safetensors dtype name), in file order
        self.tensors = {name: (8 + n + begin, dtype, shape, label) for begin, end, name, dtype, shape, label in spans}

    def read(self, name, start=0, stop=None):
        """Rows start:stop (along the first axis) of tensor `name`; BF16 comes back float32."""
        offset, dtype, shape, label = self.tensors[name]
        rows = shape[0] if shape else 1
        stop = rows if stop is None else min(stop, rows)
        row = math.prod(shape[1:])
        self.f.seek(offset + start * row * dtype.itemsize)
        arr = np.fromfile(self.f, dtype, (stop - start) * row).reshape((stop - start,) + shape[1:] if shape else ())
        if label == "BF16":  # bfloat16 is the top half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_safetensors(path, data=True):
    """Read a safetensors file -> (name -> array, metadata), validating the whole header
    against the file's size before reading any tensor. data=False: ({}, metadata)."""
    with SafetensorsFile(path) as f:
        return ({name: f.read(name) for name in f.tensors} if data else {}), f.metadata
