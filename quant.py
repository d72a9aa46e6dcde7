"""int8 weights for decoding: a matrix stored as int8 rows with one float32 scale per
group of GROUP consecutive inputs, and the Numba kernel that multiplies by it.

Decoding one token reads every weight once, so its speed is memory bandwidth over
bytes per weight: float32 is 4 bytes, int8 with a scale per 64 is 1 + 4/64 = 1.0625.
Per group (as llama.cpp's Q8_0 and llama2.c's runq) and not per row: one outlier
then coarsens 63 weights, not a whole row. 64 and not 32: 6% fewer bytes a token;
the KL divergence from float32's predictions grows 1.2-1.3x, from 5e-5 to 6e-5
nats/token on the TinyStories checkpoint (README), far below what changes a reply.

    w ~ scale[o, j // GROUP] * q[o, j],   q = round(w / scale) in [-127, 127],
    scale = max |w| over the group / 127, so the error is at most scale / 2.

The kernel rounds its input vector to int16 per group (quantize_x16), so a group's
products are integer multiply-adds: at memory speed on 2 cores, where converting each
weight to float32 was not. Its inner loop is spelled in LLVM vector operations
(groups_dot), so that every x86-64 CPU gets the same multiply-adds on its widest
registers, and asks for the rows ahead before it reaches them (_prefetch);
groups_dot_reference is the same sum in plain loops.

quantize(model) and checkpoint.load(path, quantize="int8") build models from these
(the section "int8 models"); the last section decodes one token through such a model
in a Numba call per block, the hook Chimera.step calls.
Each kernel has a plain NumPy twin in tests/test_quant.py.
"""
import json
import math
import sys

from autograd import FAST, LANES, Tensor, dot, exp, is_grad_enabled, lane_sum, rmsnorm_row

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, models, register_model

import wyrd
from tensorfile import CheckpointError

ir = cgutils.ir  # Numba's LLVM IR builder (llvmlite, which Numba ships and uses)

GROUP = 64
MATVEC_ROWS = 8  # up to this many tokens the kernel reads each weight once for all of them;
# more go through BLAS on blocks of dequantised rows: 4 MB when the Numba kernels run on
# one thread (1 MB, the L2's size, made 64- and 512-token medium prefills 10-13% slower:
# BLAS is slower on thinner blocks), else 8 MB, as each block then hands the cores from
# Numba's threads to BLAS's and back (2 MB blocks made a long prefill 2x slower)
BLOCK_FLOATS, PARALLEL_BLOCK_FLOATS = 1 << 20, 1 << 21


def quantize_rows(w):
    """float [O, I] -> (q int8 [O, I], scale float32 [O, ceil(I / GROUP)]); a last group
    shorter than GROUP has a scale of its own. An all-zero group gets scale 0."""
    w = np.asarray(w, np.float32)
    O, I = w.shape
    ng = -(-I // GROUP)
    padded = np.zeros((O, ng * GROUP), np.float32)
    padded[:, :I] = w
    groups = padded.reshape(O, ng, GROUP)
    scale = np.abs(groups).max(axis=2) / np.float32(127)
    safe = np.where(scale > 0, scale, np.float32(1))[..., None]
    q = np.rint(groups / safe).astype(np.int8).reshape(O, ng * GROUP)[:, :I]
    return np.ascontiguousarray(q), scale


@njit(cache=True, fastmath=FAST)
def quantize_x16(x):
    """x float32 [T, I] -> (xq int16 [T, I], xs float32 [T, ceil(I / GROUP)]) with
    x ~ xs[t, j // GROUP] xq[t, j], xs = max |x| over the group / 32767: an error of
    at most 1/65534 of the group's largest |x| (the weights' int8 step is 258x coarser).
    A group holding NaN or inf gets xs = NaN, so the products it enters are NaN."""
    T, I = x.shape
    xq = np.empty((T, I), np.int16)
    xs = np.empty((T, -(-I // GROUP)), np.float32)
    for t in range(T):
        for g in range(xs.shape[1]):
            part = x[t, g * GROUP:(g + 1) * GROUP]
            top, finite = np.float32(0), True
            for v in part:
                top = max(top, abs(v))
                finite = finite and np.isfinite(v)
            xs[t, g] = top / np.float32(32767) if finite else np.nan
            inv = np.float32(32767) / top if finite and top > 0 else np.float32(0)
            for k in range(part.size):
                xq[t, g * GROUP + k] = np.int16(np.rint(part[k] * inv))
    return xq, xs


# ---------------------------------------------------------------------------
# The kernel's inner loop as LLVM vector operations. Written as plain loops
# (groups_dot_reference), its machine code is whatever LLVM's vectorisers choose for
# the CPU at hand: on every x86-64 CPU, 128-bit multiply-adds and a horizontal sum each
# group, which keeps up with memory on Zen 1's 128-bit units but is compute-bound on an
# AVX-512 Xeon. As vectors, LLVM only picks the instructions: vpmaddwd (vpdpwssd with
# VNNI) on the widest registers, and a row's sums stay in LANES float32 lanes to its end.
# tests/test_quant_asm.py compiles it for seven x86-64 CPUs and checks the instructions.

# LANES (autograd's 16): a row's float32 partial sums, a zmm register (two ymm), which
# AVX-512's multiply-adds fill without a shuffle


class _Lanes(types.Type):
    """A row's LANES partial sums as one LLVM vector value: a register through the loop."""

    def __init__(self):
        super().__init__(name=f"Lanes{LANES}")


_lanes = _Lanes()
_F32x, _I32 = ir.VectorType(ir.FloatType(), LANES), ir.IntType(32)
_FLAGS = tuple(sorted(FAST))


@register_model(_Lanes)
class _LanesModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _F32x)


def _pick(builder, v, lanes):
    """The vector of v's lanes at these indices."""
    lanes = list(lanes)
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, len(lanes)), lanes))


def _fold(v, add, builder, width):
    """Add v's upper half to its lower half until `width` lanes remain."""
    while v.type.count > width:
        half = v.type.count // 2
        v = add(_pick(builder, v, range(half)), _pick(builder, v, range(half, 2 * half)))
    return v


@intrinsic
def _lanes_zero(typingctx):
    return _lanes(), lambda context, builder, sig, args: ir.Constant(_F32x, None)


@intrinsic
def _madd_group(typingctx, acc, q, scale, xq, xs, o, t, g):
    """acc + scale[o, g] xs[t, g] s, with s[l] the sum of q[o, k] xq[t, k] over the k of
    group g with (k // 2) % LANES == l: adjacent products added in pairs (what one
    pmaddwd does to 16-bit lanes), then upper halves onto lower ones (whole registers).
    |s| <= 4 * 127 * 32767 < 2^24, exact in float32. It loads its own operands: Numba would
    check each index's sign again every group."""
    for arr, dtype in ((q, types.int8), (scale, types.float32), (xq, types.int16), (xs, types.float32)):
        if not (isinstance(arr, types.Array) and arr.ndim == 2 and arr.layout == "C" and arr.dtype == dtype):
            raise TypingError(f"_madd_group takes C-contiguous 2-D {dtype} arrays, not {arr}")

    def codegen(context, builder, sig, args):
        o, t, g = args[5:]

        def at(i, row, col):  # a pointer to args[i][row, col]
            return cgutils.get_item_pointer(context, builder, sig.args[i],
                                            context.make_array(sig.args[i])(context, builder, args[i]), [row, col])

        def group(i, row):  # args[i][row, group g] as GROUP int32 lanes
            vec = ir.VectorType(context.get_data_type(sig.args[i].dtype), GROUP)
            ptr = builder.bitcast(at(i, row, builder.mul(g, ir.Constant(g.type, GROUP))), vec.as_pointer())
            return builder.sext(builder.load(ptr, align=1), ir.VectorType(_I32, GROUP))
        p = builder.mul(group(1, o), group(3, t))
        s = builder.add(_pick(builder, p, range(0, GROUP, 2)), _pick(builder, p, range(1, GROUP, 2)))
        s = _fold(s, builder.add, builder, LANES)
        scale = builder.fmul(builder.load(at(2, o, g)), builder.load(at(4, t, g)), flags=_FLAGS)
        scales = _pick(builder, builder.insert_element(ir.Constant(_F32x, None), scale, ir.Constant(_I32, 0)), [0] * LANES)
        return builder.fadd(args[0], builder.fmul(builder.sitofp(s, _F32x), scales, flags=_FLAGS), flags=_FLAGS)
    return _lanes(acc, q, scale, xq, xs, types.intp, types.intp, types.intp), codegen


# How far ahead of the weight being read the kernel asks for the next ones (past a row's
# end is the next row): with the hardware prefetchers alone, an AVX-512 Xeon fed it at
# about half the rate of OpenBLAS's float32 matvec, which prefetches in software too.
# 4-16 KB measured alike (docs/results/benchmarks.md).
PREFETCH = 8192


@intrinsic
def _prefetch(typingctx, q, o, g):
    """Ask for the cache line PREFETCH bytes past q[o, g GROUP] (a hint: never a fault,
    even past the array's end)."""
    def codegen(context, builder, sig, args):
        row = cgutils.get_item_pointer(context, builder, sig.args[0], context.make_array(sig.args[0])(context, builder, args[0]),
                                       [args[1], builder.mul(args[2], ir.Constant(args[2].type, GROUP))])
        byte = ir.IntType(8).as_pointer()
        ahead = builder.gep(builder.bitcast(row, byte), [ir.Constant(ir.IntType(64), PREFETCH)])
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte] + [_I32] * 3),
                                            "llvm.prefetch.p0i8")
        builder.call(fn, [ahead, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])  # read, keep, data
        return context.get_dummy_value()
    return types.none(q, types.intp, types.intp), codegen


@intrinsic
def _lanes_sum(typingctx, acc):
    def codegen(context, builder, sig, args):
        total = _fold(args[0], lambda a, b: builder.fadd(a, b, flags=_FLAGS), builder, 1)
        return builder.extract_element(total, ir.Constant(_I32, 0))
    return types.float32(acc), codegen


@njit(cache=True, fastmath=FAST)
def groups_dot(q, scale, xq, xs, o, t, first, stop):
    """The sum over groups first <= g < stop, all whole, of scale[o, g] xs[t, g] sum_k
    q[o, k] xq[t, k] (k in group g): int8 row o times token t's int16 input."""
    acc = _lanes_zero()
    for g in range(first, stop):
        _prefetch(q, o, g)
        acc = _madd_group(acc, q, scale, xq, xs, o, t, g)
    return _lanes_sum(acc)


@njit(cache=True, fastmath=FAST)
def groups_dot_reference(q, scale, xq, xs, o, t, first, stop):
    """groups_dot in plain loops, where the last group may be short: the tests'
    reference for it, and the kernel's way through a row's short last group."""
    acc = np.float32(0)
    for g in range(first, stop):
        s = np.int32(0)  # |s| < 64 * 127 * 32767 < 2^31; np.int32() keeps Numba from int64
        for k in range(g * GROUP, min((g + 1) * GROUP, q.shape[1])):
            s = np.int32(s + np.int32(q[o, k]) * np.int32(xq[t, k]))
        acc += scale[o, g] * xs[t, g] * np.float32(s)
    return acc


@njit(parallel=True, cache=True, fastmath=FAST)
def matvec_kernel(q, scale, x, out):
    """out[t, o] = sum_j scale[o, j // GROUP] q[o, j] x[t, j], parallel over rows o; the
    tokens t loop inside, so a row is read from memory once. x is first rounded to int16
    per group (quantize_x16), so each group's sum is 16-bit integer multiply-adds
    (groups_dot), then out = sum_g scale xs (int32 sum). q: C-contiguous."""
    xq, xs = quantize_x16(x)
    full = q.shape[1] // GROUP
    for o in prange(q.shape[0]):
        for t in range(x.shape[0]):
            acc = groups_dot(q, scale, xq, xs, o, t, 0, full)
            if full < xs.shape[1]:  # a short last group (a call: kept out of rows without one)
                acc += groups_dot_reference(q, scale, xq, xs, o, t, full, full + 1)
            out[t, o] = acc


@njit(parallel=True, cache=True, fastmath=FAST)
def dequantize_kernel(q, scale, out):
    """out[o, j] = scale[o, j // GROUP] q[o, j]."""
    for o in prange(q.shape[0]):
        for j in range(q.shape[1]):
            out[o, j] = scale[o, j // GROUP] * np.float32(q[o, j])


class Int8Linear:
    """y = x W^T + b with W int8 [out, in] and per-group scales; inference only."""

    def __init__(self, q, scale, bias=None, group=None):
        self.q, self.scale, self.bias = q, scale, bias
        self.shape = q.shape
        self.group = group  # (Int8Group, first row, end row) when these rows are part of one

    @classmethod
    def empty(cls, d_out, d_in, bias=None):
        return cls(np.empty((d_out, d_in), np.int8), np.empty((d_out, -(-d_in // GROUP)), np.float32), bias)

    def set_rows(self, start, w):
        """Quantise float rows w into rows start.. (a model is quantised a block at a time)."""
        self.q[start:start + len(w)], self.scale[start:start + len(w)] = quantize_rows(w)

    def dequantize(self, start=0, stop=None):
        q, scale = self.q[start:stop], self.scale[start:stop]
        out = np.empty(q.shape, np.float32)
        dequantize_kernel(q, scale, out)
        return out

    def __call__(self, x):
        if self.group is not None:
            group, start, stop = self.group
            return Tensor(group.product(x)[..., start:stop])
        if is_grad_enabled():
            raise RuntimeError("this model has int8 weights, for inference only: train the float32 model "
                               "(checkpoint.load without quantize), or run it under autograd.no_grad()")
        O, I = self.shape
        x2 = np.ascontiguousarray(x.data, np.float32).reshape(-1, I)
        y = np.empty((x2.shape[0], O), np.float32)
        if x2.shape[0] <= MATVEC_ROWS:
            # on every core, even where float32 decoding keeps the small kernels on one
            # (wyrd.serial_kernels): one core alone cannot read memory at full speed
            prev = numba.get_num_threads()
            if prev == numba.config.NUMBA_NUM_THREADS:  # int8 decoding (wyrd.Chimera.step)
                matvec_kernel(self.q, self.scale, x2, y)
            else:  # each set_num_threads costs ~4 us: ~0.5 ms a token if done every time
                numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
                try:
                    matvec_kernel(self.q, self.scale, x2, y)
                finally:
                    numba.set_num_threads(prev)
        else:  # a prompt chunk: BLAS on dequantised blocks (same maths; sums in another order)
            rows = max(1, (BLOCK_FLOATS if numba.get_num_threads() == 1 else PARALLEL_BLOCK_FLOATS) // I)
            for start in range(0, O, rows):
                y[:, start:start + rows] = x2 @ self.dequantize(start, start + rows).T
        if self.bias is not None:
            y += self.bias
        return Tensor(y.reshape(*x.shape[:-1], O))


class Int8Group:
    """Matrices that read the same input (an attention layer's q, k and v; the RG-LRU's
    three input projections; the FFN's w1 and w3) stored as one: one kernel call reads
    all their rows, 4 parallel loops a layer instead of 7. Each part is an Int8Linear
    over its rows; the first part called with an input computes the whole product, and
    the others take their columns of it."""

    def __init__(self, matrix, bounds, biased):
        self.matrix, self.x, self.y, self.left = matrix, None, None, 0
        self.parts = [Int8Linear(matrix.q[a:b], matrix.scale[a:b], matrix.bias[a:b] if has else None, (self, a, b))
                      for (a, b), has in zip(bounds, biased)]

    def product(self, x):
        if x is not self.x:
            self.x, self.y, self.left = x, self.matrix(x).data, len(self.parts)
        y, self.left = self.y, self.left - 1
        if self.left == 0:  # every part has its columns: let the input and product go
            self.x = self.y = None
        return y


class Int8Embedding:
    """The token embedding as int8 rows; with tied weights also the output head."""

    def __init__(self, table):
        self.table = table  # an Int8Linear [vocab, d]

    def __call__(self, ids):
        ids = np.asarray(ids)
        rows = self.table.q[ids.reshape(-1)], self.table.scale[ids.reshape(-1)]
        out = np.empty(rows[0].shape, np.float32)
        dequantize_kernel(*rows, out)
        return Tensor(out.reshape(*ids.shape, -1))

    def head(self, x):
        """Logits x E^T."""
        return self.table(x)


# ---------------------------------------------------------------------------
# int8 models: the matrices (every Linear, the embedding and an untied head) as
# Int8Linears; norms, biases and the RG-LRU vectors stay float32. A quarter of the
# bytes, and decoding reads every weight once per token (speed and quality by
# machine: docs/results/benchmarks.md).


def quantize(model):
    """-> an int8 inference copy of a float wyrd.Chimera (whose weights are left as they
    are). Its `step`, `__call__` and `loss` work under autograd.no_grad(); it cannot train.
    checkpoint.load(path, quantize="int8") builds the same model from a file."""
    if model.quantized:
        raise ValueError(f"this model is already {model.quantized}")
    state = model.state_dict()
    bad_values = [name for name, a in state.items() if not np.isfinite(a).all()]
    if bad_values:
        print(f"warning: {len(bad_values)} tensor(s) hold NaN or Inf values, e.g. {bad_values[0]}", file=sys.stderr)
    qmodel = wyrd.Chimera(model.config, dtype=np.float32, init=None)
    rows = 1 << 12  # rows at a time, as a file is read: quantising makes temporaries of its block

    def blocks(name, shape):
        for start in range(0, shape[0], rows):
            yield start, state[name][start:start + rows].astype(np.float32, copy=False)

    fill_int8(qmodel, blocks)
    for name, p in qmodel.named_parameters():  # the float ones left
        p.data[...] = state[name]
    qmodel.int8 = Int8Decoder(qmodel)
    return qmodel


# Linears that read the same input: int8 stores each set as one matrix (Int8Group)
SHARED_INPUT = [("input_proj", "input_gate_proj", "recurrence_gate_proj"), ("q_proj", "k_proj", "v_proj"),
                ("w1", "w3")]


def int8_matrices(model):
    """(owner, attributes, name prefix) of the matrices int8 quantisation replaces; the
    attributes of one entry read the same input and become one int8 matrix."""
    yield model, ("embed_tokens",), ""
    if not model.config.tie_word_embeddings:
        yield model, ("lm_head",), ""
    for i, layer in enumerate(model.layers):
        for part in ("temporal_mix", "ffn"):
            owner = getattr(layer, part)
            attrs = [a for a, m in vars(owner).items() if isinstance(m, (wyrd.Linear, Int8Linear))]
            for shared in SHARED_INPUT:
                if set(shared) <= set(attrs):
                    yield owner, shared, f"layers.{i}.{part}."
                    attrs = [a for a in attrs if a not in shared]
            for a in attrs:
                yield owner, (a,), f"layers.{i}.{part}."


def int8_named_matrices(model):
    """(spec name without ".weight", its module) of each matrix int8 quantisation
    replaces: for a quantised model the Int8Linear."""
    for owner, attrs, prefix in int8_matrices(model):
        for a in attrs:
            m = getattr(owner, a)
            yield prefix + a, getattr(m, "table", m)  # an Int8Embedding holds its Int8Linear as .table


def int8_linears(model):
    """The Int8Linear of every int8 matrix of a quantised model (none for a float one)."""
    return [m for _, m in int8_named_matrices(model)] if model.quantized else []


def scale_shapes(model):
    """name -> shape of the `.weight_scale` an int8 file stores beside each matrix."""
    shapes = {}
    for name, m in int8_named_matrices(model):
        rows, cols = m.weight.shape
        shapes[name + ".weight_scale"] = (rows, -(-cols // GROUP))
    return shapes


# How an int8 file says what it holds (__metadata__['quantization']); load reads no other
INT8_FILE = {"method": "int8", "group": GROUP}


def check_int8_file(path, text, quantize):
    try:
        given = json.loads(text)
    except (ValueError, RecursionError):
        given = None
    if given != INT8_FILE:
        raise CheckpointError(f"{path}: __metadata__['quantization'] is {text[:80]!r}; "
                              f"Wyrd reads int8 files of {json.dumps(INT8_FILE)}")
    if quantize != "int8":
        raise CheckpointError(f"{path} holds int8 weights, which only decode: load it with quantize='int8' "
                              "(chat.py --quantize int8); to train, use the float checkpoint")


def fill_int8(model, blocks, int8_file=False):
    """Replace each matrix of a Chimera(init=None) by an Int8Linear filled from
    blocks(name, shape) -> (first row, rows): float rows are quantised as they come,
    an int8 file's (int8_file) are read as stored, with their scales."""
    if model.dtype != np.float32:
        raise ValueError(f"int8 models compute in float32, not {model.dtype}")
    for owner, attrs, prefix in int8_matrices(model):
        parts = [getattr(owner, a) for a in attrs]
        ends = np.cumsum([m.weight.shape[0] for m in parts])
        bounds = list(zip([0, *ends[:-1]], ends))
        biased = [hasattr(m, "bias") for m in parts]
        matrix = Int8Linear.empty(ends[-1], parts[0].weight.shape[1],
                                  np.zeros(ends[-1], np.float32) if any(biased) else None)
        for a, m, (start, stop), has in zip(attrs, parts, bounds, biased):
            name = prefix + a + ".weight"
            if int8_file:  # as checkpoint.save(dtype="int8") writes them: q in [-127, 127], scales >= 0
                for row, q in blocks(name, m.weight.shape):
                    if q.size and q.min() < -127:
                        raise ValueError(f"{name} holds -128; int8 weights are in [-127, 127]")
                    matrix.q[start + row:start + row + len(q)] = q
                for row, scale in blocks(name + "_scale", matrix.scale[start:stop].shape):
                    if (scale < 0).any():
                        raise ValueError(f"{name}_scale holds negative scales")
                    matrix.scale[start + row:start + row + len(scale)] = scale
            else:
                for row, block in blocks(name, m.weight.shape):
                    matrix.set_rows(start + row, block)
            for row, block in blocks(prefix + a + ".bias", (stop - start,)) if has else ():
                matrix.bias[start + row:start + row + len(block)] = block
        if len(parts) > 1:
            for a, part in zip(attrs, Int8Group(matrix, bounds, biased).parts):
                setattr(owner, a, part)
        else:
            setattr(owner, attrs[0], Int8Embedding(matrix) if isinstance(parts[0], wyrd.Embedding) else matrix)


# ---------------------------------------------------------------------------
# One decoded token through an int8 model, a Numba call per block (Chimera.step's
# fast path). The general path runs ~25 small ops a block through autograd, each a
# few microseconds of Python and kernel dispatch: ~3 ms of a medium token's ~12,
# while its weights stream from memory in ~9. Here a block's norms, gates, RoPE,
# ring update, attention and SwiGLU run inside one compiled function between its
# matrix products. x [B, d] is one token per sequence; every block adds to it in place.


@njit(cache=True, fastmath=FAST)
def _rmsnorm(x, w, eps):
    """x / sqrt(mean(x^2) + eps) * w, per row of x [B, d], on this thread."""
    y, r = np.empty_like(x), np.empty(x.shape[0], x.dtype)
    for b in range(x.shape[0]):
        rmsnorm_row(x[b], w, eps, y[b], r[b:b + 1])
    return y


@njit(cache=True, fastmath=FAST)
def _linear(q, scale, bias, x):
    """x W^T + b through matvec_kernel, on every core; bias of size 0 for none."""
    y = np.empty((x.shape[0], q.shape[0]), np.float32)
    matvec_kernel(q, scale, x, y)
    for b in range(y.shape[0] if bias.size else 0):
        for o in range(y.shape[1]):
            y[b, o] += bias[o]
    return y


@njit(cache=True, fastmath=FAST)
def _add_linear(x, q, scale, inp):
    """x += inp W^T: a block's residual add."""
    y = _linear(q, scale, np.zeros(0, np.float32), inp)
    for b in range(x.shape[0]):
        for o in range(x.shape[1]):
            x[b, o] += y[b, o]


@njit(cache=True, fastmath=FAST)
def _exp(z, c):
    """e^(c z) of a float32 array, c float32, through autograd.exp (arithmetic LLVM
    vectorises: relative error < 5e-7, 0 below -87.33, inf from 88.38, NaN kept)."""
    zf = np.ascontiguousarray(z).reshape(-1)                         # (a copy only if z is a strided view)
    p = np.empty(zf.size, np.float32)
    for i in range(zf.size):
        p[i] = exp(c * zf[i])
    return p.reshape(z.shape)


@njit(cache=True, fastmath=FAST)
def recurrent_token(x, h, norm1, q, scale, bias, c_log_a, norm_h, q_out, scale_out, eps):
    """x += output_proj(norm(h)) with the RG-LRU state h [B, d] advanced in place:
    [xp, i, r] = W [input_proj; input_gate_proj; recurrence_gate_proj] norm1(x) + b,
    a_t = exp(c_log_a sigmoid(r)) with c_log_a = c log(sigmoid(lambda) + 1e-8) [d],
    h = a_t h + sqrt(1 - a_t^2 + 1e-6) sigmoid(i) xp. (Loops, not array expressions,
    here and below: they compile to about half the machine code, architecture 7.1.)"""
    B, d = x.shape
    y = _linear(q, scale, bias, _rmsnorm(x, norm1, eps))            # [B, 3d]: xp, i, r
    e = _exp(y[:, d:], np.float32(-1))                              # e^-i, e^-r
    a = np.empty((B, d), np.float32)
    for b in range(B):
        for j in range(d):
            a[b, j] = c_log_a[j] / (np.float32(1) + e[b, d + j])    # sigmoid(z) = 1 / (1 + e^-z)
    a = _exp(a, np.float32(1))
    for b in range(B):
        for j in range(d):
            gated = y[b, j] / (np.float32(1) + e[b, j])
            h[b, j] = a[b, j] * h[b, j] + np.sqrt(np.float32(1 + 1e-6) - a[b, j] * a[b, j]) * gated
    _add_linear(x, q_out, scale_out, _rmsnorm(h, norm_h, eps))


@njit(parallel=True, cache=True, fastmath=FAST)
def _attend(qh, k_ring, v_ring, n, out):
    """out[b, h] = softmax(q k^T / sqrt(D)) v over ring slots 0..n-1 of kv head
    h // (H / KV): a full ring holds exactly the window, in any order (each key
    carries its position in its RoPE rotation). qh [B, H, D], rings [B, KV, W, D]."""
    B, H, D = qh.shape
    group = H // k_ring.shape[1]
    scale = np.float32(1 / math.sqrt(D))
    for bh in prange(B * H):
        b, hd = bh // H, bh % H
        q, K, V = qh[b, hd], k_ring[b, hd // group], v_ring[b, hd // group]
        p, lanes = np.empty(n, np.float32), np.empty(LANES, np.float32)
        for j in range(n):
            p[j] = dot(q, K[j], lanes)
        top = p.max()
        for j in range(n):
            p[j] -= top
        p = _exp(p, scale)                                             # e^((q k - max) / sqrt(D))
        acc = np.zeros(D, np.float32)
        m = n // 4 * 4
        for j in range(0, m, 4):  # four values a pass: acc is loaded and stored a quarter as often
            v0, v1, v2, v3 = V[j], V[j + 1], V[j + 2], V[j + 3]
            for e in range(D):
                acc[e] += p[j] * v0[e] + p[j + 1] * v1[e] + p[j + 2] * v2[e] + p[j + 3] * v3[e]
        for j in range(m, n):
            for e in range(D):
                acc[e] += p[j] * V[j, e]
        total = lane_sum(p, lanes)
        for e in range(D):
            out[b, hd, e] = acc[e] / total


@njit(cache=True, fastmath=FAST)
def attention_token(x, k_ring, v_ring, pos, theta, norm1, q, scale, q_out, scale_out, n_heads, eps):
    """x += o_proj(attention) for the token at position pos: its q and k rotated by
    RoPE's angles pos theta^(-2j/D), its k and v stored in ring slot pos % W, then _attend."""
    B, KV, W, D = k_ring.shape
    H, half = n_heads, D // 2
    cos, sin = np.empty(half, np.float32), np.empty(half, np.float32)
    for i in range(half):
        angle = pos * theta ** (-2.0 * i / D)                        # in float64, as wyrd.rope_angles
        cos[i], sin[i] = math.cos(angle), math.sin(angle)
    qkv = _linear(q, scale, np.zeros(0, np.float32), _rmsnorm(x, norm1, eps)).reshape(B, H + 2 * KV, D)
    for b in range(B):
        for hd in range(H + KV):                                     # RoPE on the q and k heads
            for i in range(half):
                x1, x2 = qkv[b, hd, i], qkv[b, hd, half + i]
                qkv[b, hd, i], qkv[b, hd, half + i] = x1 * cos[i] - x2 * sin[i], x2 * cos[i] + x1 * sin[i]
        for kv in range(KV):
            for e in range(D):
                k_ring[b, kv, pos % W, e], v_ring[b, kv, pos % W, e] = qkv[b, H + kv, e], qkv[b, H + KV + kv, e]
    o = np.empty((B, H, D), np.float32)
    _attend(qkv[:, :H].copy(), k_ring, v_ring, min(pos + 1, W), o)
    _add_linear(x, q_out, scale_out, o.reshape(B, H * D))


@njit(cache=True, fastmath=FAST)
def ffn_token(x, norm2, q13, scale13, q2, scale2, eps):
    """x += w2(silu(w1 n) * (w3 n)), n = norm2(x), with [w1; w3] one matrix."""
    B, f = x.shape[0], q2.shape[1]
    g = _linear(q13, scale13, np.zeros(0, np.float32), _rmsnorm(x, norm2, eps))   # [B, 2f]
    e = _exp(g[:, :f], np.float32(-1))
    s = np.empty((B, f), np.float32)
    for b in range(B):
        for j in range(f):
            s[b, j] = g[b, j] / (np.float32(1) + e[b, j]) * g[b, f + j]    # silu(z) = z sigmoid(z)
    _add_linear(x, q2, scale2, s)


@njit(cache=True, fastmath=FAST)
def embed_token(ids, q, scale):
    """x [B, d] = the dequantised embedding rows of ids [B]."""
    x = np.empty((ids.size, q.shape[1]), np.float32)
    dequantize_kernel(q[ids], scale[ids], x)
    return x


@njit(cache=True, fastmath=FAST)
def head_token(x, norm, q, scale, eps):
    """logits = norm(x) W^T [B, V] for the last hidden x [B, d]."""
    return _linear(q, scale, np.zeros(0, np.float32), _rmsnorm(x, norm, eps))


# A token's kernels run on every core. A prompt chunk's time is in BLAS's products, so
# up to 512 tokens its other kernels stay on one thread and BLAS keeps both cores
# (architecture §7.1)
SERIAL_ROWS = 512


class Int8Decoder:
    """Chimera.step's hook for an int8 model (model.int8): up to MATVEC_ROWS sequences
    of one token each go through the kernels above, a Numba call per block, instead of
    ~25 ops each dispatched from Python. After reading ~250 MB of weights a token the
    caches hold none of Python's own code and data, so every line of Python here costs
    ~10x what it costs in a loop: the blocks' arrays are gathered once."""

    def __init__(self, model):
        self.model = model
        self.refresh()

    def refresh(self):
        """Gather the arrays each kernel takes: the embedding's; per layer (is attention,
        the mix's, the FFN's); the head's. Again after load_state_dict, as the RG-LRU's
        c log a is computed here once (an int8 model never trains), in float64 because
        sigmoid(lambda) can be within 1e-4 of 1."""
        model = self.model
        table = model.embed_tokens.table
        head = table if model.config.tie_word_embeddings else model.lm_head
        blocks = [(table.q, table.scale)]
        for layer in model.layers:
            mix, ffn, norm1 = layer.temporal_mix, layer.ffn, layer.norm1.weight.data
            if isinstance(mix, wyrd.LocalAttention):
                qkv = mix.q_proj.group[0].matrix
                mix_arrays = (norm1, qkv.q, qkv.scale, mix.o_proj.q, mix.o_proj.scale)
            else:
                m = mix.input_proj.group[0].matrix
                c_log_a = (mix.c * wyrd.rglru_log_a(mix.lambda_param.data)[0]).astype(np.float32)
                mix_arrays = (norm1, m.q, m.scale, m.bias, c_log_a, mix.norm.weight.data,
                              mix.output_proj.q, mix.output_proj.scale)
            w13 = ffn.w1.group[0].matrix
            blocks.append((isinstance(mix, wyrd.LocalAttention), mix_arrays,
                           (layer.norm2.weight.data, w13.q, w13.scale, ffn.w2.q, ffn.w2.scale)))
        self.blocks = tuple(blocks) + ((model.norm.weight.data, head.q, head.scale),)

    def takes(self, ids):
        return ids.ndim == 2 and ids.shape[1] == 1 and 0 < ids.size <= MATVEC_ROWS

    def serial(self, n):
        """Whether Chimera.step runs an n-token chunk's kernels on one thread."""
        return MATVEC_ROWS < n <= SERIAL_ROWS

    def num_params(self):
        return sum(m.q.size + (0 if m.bias is None else m.bias.size) for m in int8_linears(self.model))

    def step(self, ids, state):
        """Chimera.step for ids [B, 1]: the next-token logits [B, V]."""
        cfg = self.model.config
        eps = np.float32(cfg.rms_norm_eps)
        flat = ids.ravel()
        if ids.dtype.kind not in "iu" or not 0 <= min(flat.tolist()) <= max(flat.tolist()) < cfg.vocab_size:
            self.model._check_ids(ids)                                # says what is wrong
        x = embed_token(flat, *self.blocks[0])                        # [B, d]
        for (attention, mix, ffn), cache in zip(self.blocks[1:-1], state.layers):
            if attention:
                attention_token(x, cache["k"], cache["v"], state.pos, cfg.rope_theta, *mix, cfg.n_heads, eps)
            else:
                recurrent_token(x, cache["h"], *mix, eps)
            ffn_token(x, *ffn, eps)
        state.pos += 1
        return head_token(x, *self.blocks[-1], eps)
