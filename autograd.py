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

import runtime  # noqa: F401  (first: the thread policy must be in place when NumPy loads)

import numpy as np
from numba import njit, prange

_grad_enabled = True
# fastmath without 'nnan'/'ninf': reassociation lets LLVM vectorise the loops,
# but infinities must keep their meaning.
FAST = {"reassoc", "contract", "nsz", "arcp"}


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
    """Logistic of a float NumPy array as 0.5 tanh(x/2) + 0.5: NumPy's SIMD tanh
    (Numba's scalar exp is 4x slower), and unlike 1/(1+exp(-x)) it cannot overflow."""
    y = np.empty(np.shape(x), x.dtype)
    np.multiply(x, 0.5, out=y)
    np.tanh(y, out=y)
    half_plus_half(y.reshape(-1))
    return y


@njit(parallel=True, cache=True, fastmath=FAST)
def half_plus_half(y):
    """y = 0.5 y + 0.5 in place, on all cores (NumPy would take two passes on one)."""
    half = y.dtype.type(0.5)  # a float64 literal would promote float32 work to float64
    for i in prange(y.size):
        y[i] = half * y[i] + half


# -- joining and splitting ------------------------------------------------------
def cat(tensors, axis=-1):
    """Concatenate along `axis`; the backward hands each input its slice."""
    ends = np.cumsum([t.shape[axis] for t in tensors])

    def backward(g):
        for t, piece in zip(tensors, np.split(g, ends[:-1], axis=axis)):
            t._acc(piece)
    return Tensor.make(np.concatenate([t.data for t in tensors], axis=axis), tuple(tensors), backward)


def split(x, sizes, axis=-1):
    """Split into pieces of the given sizes along `axis` (the inverse of cat)."""
    ends = np.cumsum(sizes)
    if ends[-1] != x.shape[axis]:
        raise ValueError(f"split sizes {list(sizes)} do not add up to {x.shape[axis]}")
    out = []
    for lo, hi in zip(ends - np.asarray(sizes), ends):
        index = [slice(None)] * x.ndim
        index[axis] = slice(int(lo), int(hi))
        out.append(x[tuple(index)])
    return out


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
    ss = x[0] * x[0]
    for j in range(1, x.size):
        ss += x[j] * x[j]
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
        for i in range(part * N // P, (part + 1) * N // P):
            dot = g[i, 0] * w[0] * x[i, 0]
            for j in range(1, D):
                dot += g[i, j] * w[j] * x[i, j]
            c = dot * r[i] * r[i] / D  # mean(gw * n) / r
            for j in range(D):
                gx[i, j] = r[i] * (g[i, j] * w[j] - x[i, j] * c)
                gw[part, j] += g[i, j] * x[i, j] * r[i]


def swiglu(a, b):
    """silu(a) * b, the SwiGLU gate, in one op (no silu(a) node kept).

    With s = sigmoid(a): d/da = b s (1 + a (1 - s)),  d/db = a s.
    """
    ad, bd = np.ascontiguousarray(a.data), np.ascontiguousarray(b.data)
    s = sigmoid(ad)
    y = np.empty_like(ad)
    swiglu_forward_kernel(ad.reshape(-1), bd.reshape(-1), s.reshape(-1), y.reshape(-1))

    def backward(g):
        ga, gb = np.empty_like(ad), np.empty_like(bd)
        swiglu_backward_kernel(ad.reshape(-1), bd.reshape(-1), s.reshape(-1),
                               np.ascontiguousarray(g).reshape(-1), ga.reshape(-1), gb.reshape(-1))
        a._acc(ga)
        b._acc(gb)
    return Tensor.make(y, (a, b), backward)


@njit(parallel=True, cache=True, fastmath=FAST)
def swiglu_forward_kernel(a, b, s, y):
    for i in prange(a.size):
        y[i] = a[i] * s[i] * b[i]


@njit(parallel=True, cache=True, fastmath=FAST)
def swiglu_backward_kernel(a, b, s, g, ga, gb):
    for i in prange(a.size):
        ga[i] = g[i] * b[i] * s[i] * (1.0 + a[i] * (1.0 - s[i]))
        gb[i] = g[i] * a[i] * s[i]


def cross_entropy(logits, targets, mask=None):
    """Mean over unmasked rows of -log softmax(logits)[target].

    logits [N, V], targets int [N], mask 0/1 [N] or None. Uses a stable
    log-sum-exp and never builds a one-hot: dL/dlogits = (softmax - onehot) m / sum(m).
    """
    z = logits.data
    n_rows = z.shape[0]
    targets = np.asarray(targets).reshape(-1)
    if targets.shape[0] != n_rows:
        raise ValueError(f"cross_entropy: {n_rows} logit rows but {targets.shape[0]} targets")
    m = np.ones(n_rows, dtype=z.dtype) if mask is None else np.asarray(mask, dtype=z.dtype).reshape(-1)
    count = m.sum()
    if count == 0:
        raise ValueError("cross_entropy: every target is masked out, the mean is undefined")
    zmax = z.max(axis=1, keepdims=True)
    e = z - zmax
    np.exp(e, out=e)                      # kept for the backward: softmax = e / sum(e)
    total = e.sum(axis=1)
    rows = np.arange(n_rows)
    loss = np.sum(m * (zmax[:, 0] + np.log(total) - z[rows, targets])) / count

    def backward(g):
        p = e  # the forward's exponentials become the gradient in place (used once)
        p *= (g * m / (count * total))[:, None]
        p[rows, targets] -= g * m / count
        logits._acc(p)
    return Tensor.make(np.asarray(loss, dtype=z.dtype), (logits,), backward)


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
