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

wyrd.quantize(model) and wyrd.load(path, quantize="int8") build models from these.
Each kernel has a plain NumPy twin in tests/test_quant.py.
"""
import numba
import numpy as np
from numba import njit, prange

from autograd import FAST, Tensor, is_grad_enabled

GROUP = 64
MATVEC_ROWS = 8  # up to this many tokens the kernel reads each weight once for all of them;
# more go through BLAS on blocks of dequantised rows: 1 MB (in L2) when the Numba kernels
# run on one thread, else 8 MB, as each block then hands the cores from Numba's threads
# to BLAS's and back (2 MB blocks made a long prefill 2x slower)
BLOCK_FLOATS, PARALLEL_BLOCK_FLOATS = 1 << 18, 1 << 21


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


@njit(parallel=True, cache=True, fastmath=FAST)
def matvec_kernel(q, scale, x, out):
    """out[t, o] = sum_j scale[o, j // GROUP] q[o, j] x[t, j], float32 accumulation,
    parallel over rows o. The tokens t loop inside, so a row is read from memory once."""
    O, I = q.shape
    for o in prange(O):
        qo, so = q[o], scale[o]
        for t in range(x.shape[0]):
            xt = x[t]
            acc = np.float32(0)
            for j in range(I):  # one flat loop: LLVM vectorises it, int8 -> float32 on the fly
                acc += so[j // GROUP] * (np.float32(qo[j]) * xt[j])
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
                               "(wyrd.load without quantize), or run it under autograd.no_grad()")
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
