"""A hand-written reverse-mode autograd over NumPy arrays.

A `Tensor` wraps a NumPy array. Every operation computes its result and, right
beside it, a `backward(g)` closure that receives dL/d(result) and *accumulates*
(`+=`) dL/d(input) into each input. `Tensor.backward()` sorts the graph
topologically and runs those closures once, in reverse. That is all of it: the
rest of this file is the list of operations.

    x = Tensor(np.random.randn(3, 4), requires_grad=True)
    loss = (x.sigmoid() * 2.0).sum()
    loss.backward()               # x.grad == 2 * sigmoid(x) * (1 - sigmoid(x))

float32 by default; every op also works in float64 (the gradient checks use it).
Fused ops (rmsnorm, swiglu, cross_entropy, linear) have their own backward where
that is faster or numerically safer than composing primitives. The Numba kernels
(RG-LRU scan, windowed attention, RoPE) live in wyrd.py beside the model that
uses them, and become differentiable ops through the same `Tensor.make`.
"""
import contextlib
import math

import runtime  # noqa: F401  (the thread policy and the allocator setting)

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

_grad_enabled = True
# fastmath without 'nnan'/'ninf' (infinities keep their meaning), and without
# 'reassoc' or 'arcp': LLVM compiled a reordered sum in a parallel kernel one way
# in-process and another for Numba's cache, so a run's bits depended on whether its
# kernels were just compiled (a resumed run drifted from the uninterrupted one).
# Sums are written in LANES interleaved parts instead (dot, lane_sum): they vectorise
# as well, in an order fixed by the code.
FAST = {"contract", "nsz"}
LANES = 16


def exp(x):
    """e^x inside Numba kernels. float32 gets the version below, float64 libm's."""
    return math.exp(x)


@overload(exp)
def _exp_float32(x):
    """e^x for float32 as arithmetic LLVM vectorises (libm's exp is a call per element,
    ~5x slower): e^x = 2^k e^r, k = rint(x / ln 2), |r| <= ln 2 / 2, e^r a degree-6
    Taylor polynomial, 2^k made from its exponent bits. Relative error < 5e-7; 0 below
    x = -87.33 (2^-126, float32's smallest normal), inf from 88.38; NaN stays NaN.
    It is compiled with its caller's fastmath flags (Numba passes them on), which
    never allow reassociation, so the two-part ln 2 stays exact."""
    if x != types.float32:
        return lambda x: math.exp(x)

    def impl(x):
        xc = min(max(x, np.float32(-87.33)), np.float32(88.7))
        k = np.float32(np.rint(xc * np.float32(1.4426950408889634)))
        r = (xc - k * np.float32(0.693359375)) + k * np.float32(2.12194440e-4)  # ln 2 in two parts, so r is exact
        e_r = np.float32(1) + r * (np.float32(1) + r * (np.float32(1 / 2) + r * (np.float32(1 / 6) + r * (
            np.float32(1 / 24) + r * (np.float32(1 / 120) + r * np.float32(1 / 720))))))
        two_k = _float32_from_bits(np.int32(k + np.float32(127)) << 23)
        return e_r * two_k if x >= np.float32(-87.33) else (np.float32(0) if x == x else x)
    return impl


@njit(inline="always")
def dot(a, b, lanes):
    """sum(a * b) over 1-D a, b: LANES interleaved partial sums (one SIMD register's
    worth, in `lanes`, scratch of LANES elements), added in order, then the tail."""
    n = a.size
    m = n - n % LANES
    lanes[:] = 0
    for j0 in range(0, m, LANES):
        for l in range(LANES):
            lanes[l] += a[j0 + l] * b[j0 + l]
    s = lanes[0]
    for l in range(1, LANES):
        s += lanes[l]
    for j in range(m, n):
        s += a[j] * b[j]
    return s


@njit(inline="always")
def lane_sum(a, lanes):
    """sum(a) over 1-D a, in the order dot uses."""
    n = a.size
    m = n - n % LANES
    lanes[:] = 0
    for j0 in range(0, m, LANES):
        for l in range(LANES):
            lanes[l] += a[j0 + l]
    s = lanes[0]
    for l in range(1, LANES):
        s += lanes[l]
    for j in range(m, n):
        s += a[j]
    return s


@intrinsic
def _float32_from_bits(typingctx, i):
    """The float32 whose bits are the int32 i (a free reinterpretation in LLVM)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.int32), codegen


def is_grad_enabled():
    return _grad_enabled


@contextlib.contextmanager
def no_grad():
    """Inside this block ops build no graph and keep no intermediates (generation)."""
    global _grad_enabled
    prev, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = prev


def unbroadcast(g, shape):
    """Sum a gradient back to `shape`: the adjoint of NumPy broadcasting.

    Broadcasting copies an operand along new leading axes and along axes of
    size 1, so its gradient is the sum of the upstream gradient over those axes.
    """
    if g.shape == tuple(shape):
        return g
    g = g.sum(axis=tuple(range(g.ndim - len(shape)))) if g.ndim > len(shape) else g
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def _basic_index(idx):
    """True when idx is basic indexing (no index arrays), so no position repeats."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    return all(isinstance(i, (int, np.integer, slice)) or i is None or i is Ellipsis for i in idx)


class Tensor:
    def __init__(self, data, requires_grad=False, dtype=None):
        data = np.asarray(data, dtype=dtype)
        if dtype is None and data.dtype.kind != "f":
            data = data.astype(np.float32)
        self.data = data
        self.grad = None
        self._grad_owned = False
        self._released = False
        self.requires_grad = requires_grad
        self._parents = ()
        self._backward = None

    @staticmethod
    def make(data, parents, backward):
        """The result of an op: joins the graph only if grad is on and an input needs it."""
        out = Tensor(data)
        if _grad_enabled and any(p.requires_grad for p in parents):
            out.requires_grad = True
            out._parents = parents
            out._backward = backward
        return out

    def _acc(self, g):
        """Accumulate a gradient into self.grad (the `+=` of every backward).

        The first gradient is stored as given, without a copy: it may be a view of
        another node's gradient (add hands the same array to both operands), so it
        is only borrowed, and a second contribution allocates instead of writing into it.
        """
        if not self.requires_grad:
            return
        if self.grad is None:
            self.grad, self._grad_owned = g.astype(self.data.dtype, copy=False), False
        elif self._grad_owned:
            self.grad += g
        else:
            self.grad, self._grad_owned = self.grad + g, True

    def backward(self, grad=None):
        """Backpropagate from this tensor (a scalar unless `grad` is given).

        Afterwards the graph is released: every intermediate drops its gradient,
        its parents and its closure (and so the arrays the closure saved), so
        memory stays flat over thousands of steps. Leaf gradients are kept.
        """
        if self._released:
            raise RuntimeError("backward() through a graph that an earlier backward() released; "
                               "run the forward again")
        if grad is None:
            if self.data.size != 1:
                raise ValueError(f"backward() needs a scalar, got shape {self.shape}; pass grad=")
            grad = np.ones_like(self.data)
        topo, seen, stack = [], set(), [(self, False)]
        while stack:  # iterative DFS: a deep model would overflow Python's recursion
            node, done = stack.pop()
            if done:
                topo.append(node)
            elif id(node) not in seen:
                seen.add(id(node))
                stack.append((node, True))
                stack.extend((p, False) for p in node._parents if p.requires_grad)
        self.grad, self._grad_owned = np.asarray(grad, dtype=self.data.dtype).copy(), True
        leaf_grads = set()
        for node in reversed(topo):  # a node comes after every node that consumes it
            if node._backward is not None:
                node._backward(node.grad)
                node.grad, node._parents, node._backward, node._released = None, (), None, True
            elif node.grad is not None and not node._grad_owned:
                # a leaf keeps its gradient: make sure it is not a view or shared with
                # another leaf, so an optimiser may scale it in place
                if not node.grad.flags.owndata or id(node.grad) in leaf_grads:
                    node.grad = node.grad.copy()
                leaf_grads.add(id(node.grad))
                node._grad_owned = True

    # -- conveniences ----------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)

    def __repr__(self):
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"

    def numpy(self):
        return self.data

    def item(self):
        return self.data.item()

    def _lift(self, other):
        return other if isinstance(other, Tensor) else Tensor(np.asarray(other, dtype=self.dtype))

    # -- arithmetic with broadcasting -------------------------------------------
    def __add__(self, other):
        other = self._lift(other)
        a, b = self, other

        def backward(g):  # d(a+b) = da + db
            a._acc(unbroadcast(g, a.shape))
            b._acc(unbroadcast(g, b.shape))
        return Tensor.make(a.data + b.data, (a, b), backward)

    def __sub__(self, other):
        other = self._lift(other)
        a, b = self, other

        def backward(g):  # d(a-b) = da - db
            a._acc(unbroadcast(g, a.shape))
            b._acc(-unbroadcast(g, b.shape))
        return Tensor.make(a.data - b.data, (a, b), backward)

    def __mul__(self, other):
        other = self._lift(other)
        a, b = self, other

        def backward(g):  # d(ab) = b da + a db
            a._acc(unbroadcast(g * b.data, a.shape))
            b._acc(unbroadcast(g * a.data, b.shape))
        return Tensor.make(a.data * b.data, (a, b), backward)

    def __truediv__(self, other):
        other = self._lift(other)
        a, b = self, other

        def backward(g):  # d(a/b) = da/b - a db/b^2
            a._acc(unbroadcast(g / b.data, a.shape))
            b._acc(unbroadcast(-g * a.data / (b.data * b.data), b.shape))
        return Tensor.make(a.data / b.data, (a, b), backward)

    def __pow__(self, p):
        assert isinstance(p, (int, float)), "only a constant scalar power"
        a = self

        def backward(g):  # d(a^p) = p a^(p-1) da
            a._acc(g * (p * a.data ** (p - 1)))
        return Tensor.make(a.data ** p, (a,), backward)

    def __neg__(self):
        return self * -1.0

    def __radd__(self, other):
        return self + other

    def __rsub__(self, other):
        return self._lift(other) - self

    def __rmul__(self, other):
        return self * other

    def __rtruediv__(self, other):
        return self._lift(other) / self

    def __matmul__(self, other):
        """Batched matmul [..., M, K] @ [..., K, N] with broadcast batch axes."""
        a, b = self, self._lift(other)
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"matmul needs 2-D or batched operands, got {a.shape} @ {b.shape}")

        def backward(g):  # dA = G B^T, dB = A^T G (summed over broadcast batch axes)
            a._acc(unbroadcast(g @ np.swapaxes(b.data, -1, -2), a.shape))
            if b.ndim == 2:  # fold the batch into one GEMM instead of a batched one plus a sum
                b._acc(a.data.reshape(-1, a.shape[-1]).T @ g.reshape(-1, g.shape[-1]))
            else:
                b._acc(unbroadcast(np.swapaxes(a.data, -1, -2) @ g, b.shape))
        return Tensor.make(a.data @ b.data, (a, b), backward)

    # -- reductions and shape ---------------------------------------------------
    def sum(self, axis=None, keepdims=False):
        a = self

        def backward(g):  # every summed element gets the same gradient
            if not keepdims and axis is not None:
                g = np.expand_dims(g, axis)
            a._acc(np.broadcast_to(g, a.shape).copy())
        return Tensor.make(a.data.sum(axis=axis, keepdims=keepdims), (a,), backward)

    def mean(self, axis=None, keepdims=False):
        n = self.data.size if axis is None else np.prod([self.shape[i] for i in np.atleast_1d(axis)])
        return self.sum(axis, keepdims) * (1.0 / float(n))

    def reshape(self, *shape):
        a = self

        def backward(g):
            a._acc(g.reshape(a.shape))
        return Tensor.make(a.data.reshape(*shape), (a,), backward)

    def transpose(self, *axes):
        a = self
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])  # x.transpose((1, 0, 2)) as well as x.transpose(1, 0, 2), like NumPy
        axes = tuple(ax % a.ndim for ax in axes) if axes else tuple(reversed(range(a.ndim)))
        inverse = tuple(int(i) for i in np.argsort(axes))

        def backward(g):  # undo the permutation
            a._acc(g.transpose(inverse))
        return Tensor.make(a.data.transpose(axes), (a,), backward)

    def __getitem__(self, idx):
        a = self
        if isinstance(idx, Tensor):
            idx = idx.data

        def backward(g):  # scatter back; np.add.at so repeated positions accumulate
            ga = np.zeros_like(a.data)
            if _basic_index(idx):
                ga[idx] = g
            else:
                np.add.at(ga, idx, g)
            a._acc(ga)
        return Tensor.make(a.data[idx], (a,), backward)

    # -- elementwise --------------------------------------------------------------
    def exp(self):
        a, y = self, np.exp(self.data)

        def backward(g):  # d e^a = e^a da
            a._acc(g * y)
        return Tensor.make(y, (a,), backward)

    def log(self):
        a = self

        def backward(g):  # d log a = da / a
            a._acc(g / a.data)
        return Tensor.make(np.log(a.data), (a,), backward)

    def sqrt(self):
        a, y = self, np.sqrt(self.data)

        def backward(g):  # d sqrt(a) = da / (2 sqrt(a))
            a._acc(g / (2.0 * y))
        return Tensor.make(y, (a,), backward)

    def sigmoid(self):
        a, y = self, sigmoid(self.data)

        def backward(g):  # d s(a) = s (1 - s) da
            a._acc(g * y * (1.0 - y))
        return Tensor.make(y, (a,), backward)

    def silu(self):
        a, s = self, sigmoid(self.data)

        def backward(g):  # d (a s(a)) = (s + a s (1 - s)) da
            a._acc(g * s * (1.0 + a.data * (1.0 - s)))
        return Tensor.make(a.data * s, (a,), backward)


def sigmoid(x):
    """Logistic of a float NumPy array, on all cores (Tensor.sigmoid, swiglu, the RG-LRU's
    plain ops)."""
    x = np.asarray(x)
    y = np.empty(x.shape, x.dtype)
    sigmoid_kernel(np.ascontiguousarray(x).reshape(-1), y.reshape(-1))
    return y


@njit(inline="always", fastmath=FAST)
def sigmoid_scalar(x):
    """1 / (1 + e^-x): e^-x overflows to inf for x < -88, and 1 / inf is the right 0.
    (One in x's type: a float64 1.0 would turn float32 work into float64.)"""
    one = type(x)(1.0)
    return one / (one + exp(-x))


@njit(parallel=True, cache=True, fastmath=FAST)
def sigmoid_kernel(x, y):
    for i in prange(x.size):
        y[i] = sigmoid_scalar(x[i])


# -- joining and splitting ------------------------------------------------------
def cat(tensors, axis=-1):
    """Concatenate along `axis`; the backward hands each input its slice."""
    ends = np.cumsum([t.shape[axis] for t in tensors])

    def backward(g):
        for t, piece in zip(tensors, np.split(g, ends[:-1], axis=axis)):
            t._acc(piece)
    return Tensor.make(np.concatenate([t.data for t in tensors], axis=axis), tuple(tensors), backward)


def split(x, sizes, axis=-1):
    """Split into pieces of the given sizes along `axis` (the inverse of cat).

    The pieces' gradients are written into one buffer that x receives once, rather
    than each piece handing x a zero-padded array of x's full size."""
    ends = np.cumsum(sizes)
    if ends[-1] != x.shape[axis]:
        raise ValueError(f"split sizes {list(sizes)} do not add up to {x.shape[axis]}")
    shared = []  # x's gradient, made by the first piece whose backward runs

    def piece(lo, hi):
        index = [slice(None)] * x.ndim
        index[axis] = slice(int(lo), int(hi))
        index = tuple(index)

        def backward(g):
            if not shared:
                shared.append(np.zeros_like(x.data))
                shared[0][index] = g
                x._acc(shared[0])
            elif x.grad is shared[0]:  # still x's gradient: fill in this piece's part
                shared[0][index] = g
            else:  # another consumer of x has replaced it: add this piece as an array of its own
                gx = np.zeros_like(x.data)
                gx[index] = g
                x._acc(gx)
        return Tensor.make(x.data[index], (x,), backward)
    return [piece(lo, hi) for lo, hi in zip(ends - np.asarray(sizes), ends)]


# -- fused ops --------------------------------------------------------------------
def embedding(weight, ids):
    """Rows of `weight` [V, d] at integer `ids` [...] -> [..., d]."""
    ids = np.asarray(ids)

    def backward(g):  # scatter-add: a token that appears twice gets both gradients
        gw = np.zeros_like(weight.data)
        scatter_add_rows(gw, ids.reshape(-1), np.ascontiguousarray(g).reshape(-1, weight.shape[1]))
        weight._acc(gw)
    return Tensor.make(weight.data[ids], (weight,), backward)


@njit(cache=True)
def scatter_add_rows(out, rows, g):
    """out[rows[n]] += g[n], in order (serial: two n may name the same row).
    np.add.at does the same ~15x slower."""
    for n in range(rows.shape[0]):
        out[rows[n]] += g[n]


def linear(x, weight, bias=None):
    """y = x @ W.T + b with W stored [out, in] as in PyTorch; x is [..., in]."""
    x2 = x.data.reshape(-1, x.shape[-1])
    y = x2 @ weight.data.T
    if bias is not None:
        y += bias.data
    parents = (x, weight) if bias is None else (x, weight, bias)

    def backward(g):  # dx = G W,  dW = G^T x,  db = sum over rows of G
        g2 = g.reshape(-1, g.shape[-1])
        x._acc((g2 @ weight.data).reshape(x.shape))
        weight._acc(g2.T @ x2)
        if bias is not None:
            bias._acc(g2.sum(axis=0))
    return Tensor.make(y.reshape(*x.shape[:-1], weight.shape[0]), parents, backward)


def linear_stack(x, weights, biases):
    """[x W_1^T + b_1, x W_2^T + b_2, ...] side by side, [..., sum of outs]: Linears that
    read the same x (q, k and v; the RG-LRU's three projections; w1 and w3) as one
    matrix product, because a wider product runs nearer the machine's peak and the
    backward's dx is then one product, not a sum of several. Biases may be None."""
    W = stacked_rows([w.data for w in weights])
    ends = np.cumsum([w.shape[0] for w in weights])
    spans = list(zip(ends - [w.shape[0] for w in weights], ends))  # each Linear's columns of y
    x2 = x.data.reshape(-1, x.shape[-1])
    y = x2 @ W.T
    for b, (lo, hi) in zip(biases, spans):
        if b is not None:
            y[:, lo:hi] += b.data
    parents = (x, *weights, *(b for b in biases if b is not None))

    def backward(g):  # as linear's, over the stacked rows: dx = G W, dW = G^T x
        g2 = np.ascontiguousarray(g).reshape(-1, g.shape[-1])
        x._acc((g2 @ W).reshape(x.shape))
        gW = g2.T @ x2
        for w, b, (lo, hi) in zip(weights, biases, spans):
            w._acc(gW[lo:hi])
            if b is not None:
                b._acc(g2[:, lo:hi].sum(axis=0))
    return Tensor.make(y.reshape(*x.shape[:-1], W.shape[0]), parents, backward)


def stacked_rows(arrays):
    """Arrays [n_i, k] as one [sum n_i, k] array: without a copy when they are
    consecutive row blocks of one C-contiguous buffer (wyrd.share_rows makes them so),
    else concatenated."""
    base = arrays[0].base
    if base is not None and base.flags.c_contiguous and all(a.base is base for a in arrays) \
            and base.size == sum(a.size for a in arrays):
        at = base.ctypes.data
        for a in arrays:
            if not a.flags.c_contiguous or a.ctypes.data != at:
                break
            at += a.nbytes
        else:
            return base.reshape(-1, arrays[0].shape[1])
    return np.concatenate(arrays)


def rmsnorm(x, weight, eps):
    """y = x / sqrt(mean(x^2) + eps) * w over the last axis.

    With r = 1/sqrt(mean(x^2) + eps) and n = x r:  dL/dx = r (gw - n mean(gw * n)),
    where gw = g * w. (From dn_i/dx_j = r (delta_ij - n_i n_j / D).)
    """
    D = x.shape[-1]
    x2 = np.ascontiguousarray(x.data).reshape(-1, D)
    y, r = np.empty_like(x2), np.empty(x2.shape[0], x2.dtype)
    rmsnorm_forward_kernel(x2, weight.data, x2.dtype.type(eps), y, r)

    def backward(g):
        gx, gw = np.empty_like(x2), np.zeros((N_PARTIAL, D), x2.dtype)
        rmsnorm_backward_kernel(x2, weight.data, r, np.ascontiguousarray(g).reshape(-1, D), gx, gw)
        x._acc(gx.reshape(x.shape))
        weight._acc(gw.sum(axis=0))
    return Tensor.make(y.reshape(x.shape), (x, weight), backward)


N_PARTIAL = 16  # row chunks for per-channel gradient sums (one partial row each: no races)


@njit(parallel=True, cache=True, fastmath=FAST)
def rmsnorm_forward_kernel(x, w, eps, y, r):
    """Rows of x [N, D]: r = 1/sqrt(mean(x^2) + eps), y = x r w."""
    for i in prange(x.shape[0]):
        rmsnorm_row(x[i], w, eps, y[i], r[i:i + 1])


@njit(cache=True, fastmath=FAST)
def rmsnorm_row(x, w, eps, y, r):
    """One row x [D]: r[0] = 1/sqrt(mean(x^2) + eps), y = x r w. quant.py normalises a
    decoded token's rows with it on one thread (a parallel loop costs more than a row)."""
    ss = dot(x, x, np.empty(LANES, x.dtype))
    r[0] = 1.0 / np.sqrt(ss / x.size + eps)
    rr = r[0]  # in x's precision, as the product below has always been
    for j in range(x.size):
        y[j] = x[j] * rr * w[j]


@njit(parallel=True, cache=True, fastmath=FAST)
def rmsnorm_backward_kernel(x, w, r, g, gx, gw):
    """gx = r (g w - n mean(g w n)) with n = x r; gw[chunk] += g n (summed by the caller)."""
    N, D = x.shape
    P = gw.shape[0]
    for part in prange(P):
        gw_row, lanes = np.empty(D, x.dtype), np.empty(LANES, x.dtype)
        for i in range(part * N // P, (part + 1) * N // P):
            for j in range(D):
                gw_row[j] = g[i, j] * w[j]
            c = dot(gw_row, x[i], lanes) * r[i] * r[i] / D  # mean(gw * n) / r
            for j in range(D):
                gx[i, j] = r[i] * (g[i, j] * w[j] - x[i, j] * c)
                gw[part, j] += g[i, j] * x[i, j] * r[i]


def swiglu(h):
    """silu(a) * b for h = [a | b] split in half along the last axis: the SwiGLU gate of
    the stacked product [w1 x | w3 x], in one op (no silu(a) node kept).

    With s = sigmoid(a): d/da = b s (1 + a (1 - s)),  d/db = a s."""
    F = h.shape[-1] // 2
    hd = np.ascontiguousarray(h.data).reshape(-1, 2 * F)
    s = sigmoid(hd[:, :F])
    y = np.empty((hd.shape[0], F), hd.dtype)
    swiglu_forward_kernel(hd, s, y)

    def backward(g):
        gh = np.empty_like(hd)
        swiglu_backward_kernel(hd, s, np.ascontiguousarray(g).reshape(-1, F), gh)
        h._acc(gh.reshape(h.shape))
    return Tensor.make(y.reshape(*h.shape[:-1], F), (h,), backward)


@njit(parallel=True, cache=True, fastmath=FAST)
def swiglu_forward_kernel(h, s, y):
    F = y.shape[1]
    for n in prange(h.shape[0]):
        for j in range(F):
            y[n, j] = h[n, j] * s[n, j] * h[n, F + j]


@njit(parallel=True, cache=True, fastmath=FAST)
def swiglu_backward_kernel(h, s, g, gh):
    F, one = g.shape[1], h.dtype.type(1.0)  # (a float64 1.0 would make float32 work float64)
    for n in prange(h.shape[0]):
        for j in range(F):
            a, b, sj = h[n, j], h[n, F + j], s[n, j]
            gh[n, j] = g[n, j] * b * sj * (one + a * (one - sj))
            gh[n, F + j] = g[n, j] * a * sj


def cross_entropy(logits, targets, mask=None):
    """Mean over unmasked rows of -log softmax(logits)[target].

    logits [N, V], targets int [N], mask 0/1 [N] or None. Uses a stable
    log-sum-exp and never builds a one-hot: dL/dlogits = (softmax - onehot) m / sum(m).
    One Numba pass over each row forward and one backward, in place of NumPy's
    five over the [N, V] logits (the largest array of a training step).
    """
    z = np.ascontiguousarray(logits.data)
    n_rows, V = z.shape
    targets = np.asarray(targets).reshape(-1)
    if targets.shape[0] != n_rows:
        raise ValueError(f"cross_entropy: {n_rows} logit rows but {targets.shape[0]} targets")
    if n_rows and (targets.min() < 0 or targets.max() >= V):
        raise ValueError(f"cross_entropy: targets must lie in [0, {V}), got [{targets.min()}, {targets.max()}]")
    m = np.ones(n_rows, dtype=z.dtype) if mask is None else np.asarray(mask, dtype=z.dtype).reshape(-1)
    count = m.sum()
    if count == 0:
        raise ValueError("cross_entropy: every target is masked out, the mean is undefined")
    e = np.empty_like(z)                       # exp(z - max): kept, the backward's softmax
    total, row_loss = np.empty(n_rows, z.dtype), np.empty(n_rows, z.dtype)
    cross_entropy_forward_kernel(z, targets, e, total, row_loss)
    loss = np.sum(m * row_loss) / count

    def backward(g):
        scale = (g * m / count).astype(z.dtype)
        cross_entropy_backward_kernel(e, total, targets, scale)  # the exponentials become the gradient
        logits._acc(e.reshape(logits.shape))
    return Tensor.make(np.asarray(loss, dtype=z.dtype), (logits,), backward)


@njit(parallel=True, cache=True, fastmath=FAST)
def cross_entropy_forward_kernel(z, targets, e, total, row_loss):
    """Per row: e = exp(z - max z), total = sum e, row_loss = max + log(total) - z[target]."""
    for n in prange(z.shape[0]):
        zmax = z[n, 0]
        for j in range(1, z.shape[1]):
            zmax = max(zmax, z[n, j])
        for j in range(z.shape[1]):
            e[n, j] = exp(z[n, j] - zmax)
        s = lane_sum(e[n], np.empty(LANES, z.dtype))
        total[n] = s
        row_loss[n] = zmax + math.log(s) - z[n, targets[n]]


@njit(parallel=True, cache=True, fastmath=FAST)
def cross_entropy_backward_kernel(e, total, targets, scale):
    """In place: e[n] = (e[n] / total[n] - onehot(targets[n])) scale[n], softmax minus the one-hot."""
    for n in prange(e.shape[0]):
        c = scale[n] / total[n]
        for j in range(e.shape[1]):
            e[n, j] *= c
        e[n, targets[n]] -= scale[n]


# -- gradient checking ---------------------------------------------------------
def gradcheck(f, inputs, eps=1e-6, rtol=1e-5, atol=1e-7, samples=None, seed=0):
    """Compare the analytic gradients of f(*inputs) with float64 central differences.

    The scalar checked is sum(f(x) * G) for a random, mixed-sign G: an all-ones G
    would hide errors that cancel over a row (normalisation backwards do that).
    `samples` limits how many entries of each input are perturbed (chosen at random).
    Returns the largest error relative to the tolerance; raises AssertionError on a mismatch.
    """
    rng = np.random.default_rng(seed)
    for t in inputs:
        if t.dtype != np.float64:
            raise TypeError("gradcheck needs float64 inputs")
        t.requires_grad, t.grad = True, None
    out = f(*inputs)
    G = rng.standard_normal(out.shape)

    def scalar():
        with no_grad():
            return float(np.sum(f(*inputs).data * G))

    out.backward(G)
    worst = 0.0
    for k, t in enumerate(inputs):
        analytic = np.zeros_like(t.data) if t.grad is None else t.grad
        if analytic.shape != t.shape:
            raise AssertionError(f"gradcheck: input {k} has shape {t.shape} but its gradient {analytic.shape}")
        idx = np.arange(t.size)
        if samples is not None and t.size > samples:
            idx = rng.choice(t.size, samples, replace=False)
        for i in idx:
            at = np.unravel_index(i, t.shape)  # index the array itself: works for any memory layout
            old = t.data[at]
            t.data[at] = old + eps
            up = scalar()
            t.data[at] = old - eps
            down = scalar()
            t.data[at] = old
            numeric = (up - down) / (2 * eps)
            a = analytic[at]
            err = abs(a - numeric) / (atol + rtol * abs(numeric))
            worst = max(worst, err)
            if err > 1:
                raise AssertionError(
                    f"gradcheck: input {k} entry {at}: analytic {a:.10g} vs numeric {numeric:.10g}")
    return worst
