"""Tests of autograd.py: every op's value against NumPy and its gradient against
finite differences (float64 gradcheck), plus the engine itself: no_grad, graph
release after backward, gradient accumulation, dtype preservation."""
import gc
import sys
import tracemalloc
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autograd  # noqa: E402
from autograd import (Tensor, cat, cross_entropy, embedding, gradcheck, linear, linear_stack,  # noqa: E402
                      no_grad, rmsnorm, sigmoid, split, stacked_rows, swiglu)

# ---------------------------------------------------------------------------
# helpers


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def pos(*shape, seed=0):
    """Positive inputs, away from 0 (for log, sqrt, division)."""
    return np.random.default_rng(seed).uniform(0.5, 2.0, shape)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def check(f, ref, *arrays):
    """f's value equals the NumPy reference, its gradient passes gradcheck, and every
    input gets a gradient of its own shape and dtype."""
    inputs = [Tensor(np.array(a, dtype=np.float64)) for a in arrays]
    with no_grad():
        out = f(*inputs)
    np.testing.assert_allclose(out.data, ref(*[np.array(a, dtype=np.float64) for a in arrays]),
                               rtol=1e-12, atol=1e-12)
    gradcheck(f, inputs)
    for t in inputs:
        assert t.grad is not None
        assert np.shape(t.grad) == t.shape, f"gradient shape {np.shape(t.grad)} != input shape {t.shape}"
        assert t.grad.dtype == np.float64


# (name, f on Tensors, the same maths on NumPy arrays, input arrays)
CASES = [
    # arithmetic with broadcasting
    ("add_broadcast", lambda a, b: a + b, lambda a, b: a + b, [rand(3, 1, 5), rand(4, 5, seed=1)]),
    ("add_scalar", lambda a: a + 1.5, lambda a: a + 1.5, [rand(3, 4)]),
    ("radd_scalar", lambda a: 1.5 + a, lambda a: 1.5 + a, [rand(3, 4)]),
    ("sub_broadcast", lambda a, b: a - b, lambda a, b: a - b, [rand(1, 5), rand(4, 1, seed=1)]),
    ("sub_scalar", lambda a: a - 0.25, lambda a: a - 0.25, [rand(2, 3)]),
    ("rsub_scalar", lambda a: 2 - a, lambda a: 2 - a, [rand(3, 4)]),
    ("mul_broadcast", lambda a, b: a * b, lambda a, b: a * b, [rand(5), rand(2, 3, 5, seed=1)]),
    ("mul_scalar", lambda a: a * -3.0, lambda a: a * -3.0, [rand(2, 5)]),
    ("rmul_scalar", lambda a: 0.5 * a, lambda a: 0.5 * a, [rand(2, 5)]),
    ("div_broadcast", lambda a, b: a / b, lambda a, b: a / b, [rand(2, 3, 5), pos(3, 1, seed=1)]),
    ("div_scalar", lambda a: a / 4.0, lambda a: a / 4.0, [rand(3, 2)]),
    ("rdiv_scalar", lambda a: 3 / a, lambda a: 3 / a, [pos(3, 4)]),
    ("pow_int", lambda a: a ** 3, lambda a: a ** 3, [rand(3, 4)]),
    ("pow_half", lambda a: a ** 0.5, lambda a: a ** 0.5, [pos(3, 4)]),
    ("pow_negative", lambda a: a ** -1.5, lambda a: a ** -1.5, [pos(5)]),
    ("neg", lambda a: -a, lambda a: -a, [rand(3, 4)]),
    ("scalar_0d_broadcast", lambda a, b: a * b + b, lambda a, b: a * b + b, [rand(3, 4), np.array(0.7)]),
    # the same tensor used twice in one expression
    ("x_times_x", lambda x: x * x, lambda x: x * x, [rand(3, 5)]),
    ("x_plus_x", lambda x: x + x, lambda x: x + x, [rand(3, 5)]),
    ("x_minus_2x", lambda x: x - x * 2.0, lambda x: x - x * 2.0, [rand(3, 5)]),
    ("x_over_x2p1", lambda x: x / (x * x + 1.0), lambda x: x / (x * x + 1.0), [rand(7)]),
    # two operands of an add receive the same upstream gradient: a later contribution
    # to one of them must not show up in the other (in either order of arrival)
    ("add_shared_grad_then_more", lambda x, w: (x + w) * np.arange(1.0, 6.0) + x * 2.0,
     lambda x, w: (x + w) * np.arange(1.0, 6.0) + x * 2.0, [rand(5), rand(5, seed=1)]),
    ("more_then_add_shared_grad", lambda x, w: x * 2.0 + (x + w) * np.arange(1.0, 6.0),
     lambda x, w: x * 2.0 + (x + w) * np.arange(1.0, 6.0), [rand(5), rand(5, seed=1)]),
    ("add_shared_grad_intermediate", lambda x, w: (lambda y: (y + w).exp() + y * y + (w + y) * 3.0)(x * 1.5),
     lambda x, w: (lambda y: np.exp(y + w) + y * y + (w + y) * 3.0)(x * 1.5), [rand(2, 3), rand(2, 3, seed=1)]),
    ("add_shared_grad_broadcast", lambda x, w: (x + w).sum(axis=0) * x[0] + w * 2.0,
     lambda x, w: (x + w).sum(axis=0) * x[0] + w * 2.0, [rand(3, 4), rand(4, seed=1)]),
    ("x_exp_x", lambda x: x * x.exp() + x.sigmoid() * x, lambda x: x * np.exp(x) + np_sigmoid(x) * x, [rand(2, 3)]),
    # matmul
    ("matmul_2d", lambda a, b: a @ b, lambda a, b: a @ b, [rand(3, 4), rand(4, 5, seed=1)]),
    ("matmul_batched", lambda a, b: a @ b, lambda a, b: a @ b, [rand(2, 3, 4), rand(2, 4, 5, seed=1)]),
    ("matmul_broadcast_batch", lambda a, b: a @ b, lambda a, b: a @ b, [rand(2, 1, 3, 4), rand(3, 4, 5, seed=1)]),
    ("matmul_2d_by_batched", lambda a, b: a @ b, lambda a, b: a @ b, [rand(3, 4), rand(2, 4, 5, seed=1)]),
    ("matmul_batch1_broadcast", lambda a, b: a @ b, lambda a, b: a @ b, [rand(3, 2, 4), rand(1, 4, 5, seed=1)]),
    ("matmul_folded_BTK_KN", lambda a, b: a @ b, lambda a, b: a @ b, [rand(2, 3, 4), rand(4, 5, seed=1)]),
    ("matmul_folded_4d", lambda a, b: a @ b, lambda a, b: a @ b, [rand(2, 2, 3, 4), rand(4, 3, seed=1)]),
    ("matmul_same_tensor", lambda a: a @ a, lambda a: a @ a, [rand(4, 4)]),
    # reductions
    ("sum_all", lambda a: a.sum(), lambda a: a.sum(), [rand(3, 4, 5)]),
    ("sum_all_keepdims", lambda a: a.sum(keepdims=True), lambda a: a.sum(keepdims=True), [rand(3, 4)]),
    ("sum_axis1", lambda a: a.sum(axis=1), lambda a: a.sum(axis=1), [rand(3, 4, 5)]),
    ("sum_axis_neg", lambda a: a.sum(axis=-1), lambda a: a.sum(axis=-1), [rand(3, 4, 5)]),
    ("sum_axis_neg2", lambda a: a.sum(axis=-2), lambda a: a.sum(axis=-2), [rand(3, 4, 5)]),
    ("sum_tuple_keepdims", lambda a: a.sum(axis=(0, 2), keepdims=True),
     lambda a: a.sum(axis=(0, 2), keepdims=True), [rand(3, 4, 5)]),
    ("sum_tuple_neg", lambda a: a.sum(axis=(0, -1)), lambda a: a.sum(axis=(0, -1)), [rand(3, 4, 5)]),
    ("mean_all", lambda a: a.mean(), lambda a: a.mean(), [rand(3, 4, 5)]),
    ("mean_axis0", lambda a: a.mean(axis=0), lambda a: a.mean(axis=0), [rand(3, 4, 5)]),
    ("mean_axis_neg_keepdims", lambda a: a.mean(axis=-1, keepdims=True),
     lambda a: a.mean(axis=-1, keepdims=True), [rand(3, 4, 5)]),
    ("mean_tuple", lambda a: a.mean(axis=(1, 2)), lambda a: a.mean(axis=(1, 2)), [rand(3, 4, 5)]),
    ("mean_tuple_keepdims", lambda a: a.mean(axis=(0, -1), keepdims=True),
     lambda a: a.mean(axis=(0, -1), keepdims=True), [rand(3, 4, 5)]),
    # shape
    ("reshape_varargs", lambda a: a.reshape(-1, 6) * np.arange(6.0), lambda a: a.reshape(-1, 6) * np.arange(6.0),
     [rand(2, 3, 4)]),
    ("reshape_tuple", lambda a: a.reshape((4, 6)) * np.arange(6.0), lambda a: a.reshape((4, 6)) * np.arange(6.0),
     [rand(2, 3, 4)]),
    ("transpose_default", lambda a: a.transpose() * np.arange(2.0), lambda a: a.transpose() * np.arange(2.0),
     [rand(2, 4, 3)]),
    ("transpose_axes", lambda a: a.transpose(1, 0, 2) * np.arange(5.0), lambda a: a.transpose(1, 0, 2) * np.arange(5.0),
     [rand(3, 4, 5)]),
    ("transpose_cyclic", lambda a: a.transpose(2, 0, 1) * np.arange(5.0), lambda a: a.transpose(2, 0, 1) * np.arange(5.0),
     [rand(3, 5, 4)]),
    # indexing
    ("index_slices", lambda a: a[1:3, ::2], lambda a: a[1:3, ::2], [rand(4, 5)]),
    ("index_ellipsis_int", lambda a: a[..., 1], lambda a: a[..., 1], [rand(2, 3, 4)]),
    ("index_newaxis", lambda a: a[None, 0, 1:], lambda a: a[None, 0, 1:], [rand(3, 4)]),
    ("index_negative_step", lambda a: a[::-2], lambda a: a[::-2], [rand(5, 2)]),
    ("index_repeated_rows", lambda a: a[[0, 2, 0, 0]], lambda a: a[[0, 2, 0, 0]], [rand(3, 4)]),
    ("index_repeated_cols", lambda a: a[:, [1, 1, 3]], lambda a: a[:, [1, 1, 3]], [rand(3, 4)]),
    ("index_2d_int_array", lambda a: a[np.array([[0, 1], [1, 1]]), 2], lambda a: a[np.array([[0, 1], [1, 1]]), 2],
     [rand(3, 4)]),
    ("index_pairs_repeated", lambda a: a[[0, 0, 1], [2, 2, 2]], lambda a: a[[0, 0, 1], [2, 2, 2]], [rand(3, 4)]),
    # elementwise
    ("exp", lambda a: a.exp(), np.exp, [rand(3, 4)]),
    ("log", lambda a: a.log(), np.log, [pos(3, 4)]),
    ("sqrt", lambda a: a.sqrt(), np.sqrt, [pos(3, 4)]),
    ("sigmoid", lambda a: a.sigmoid(), np_sigmoid, [rand(3, 4)]),
    ("sigmoid_large", lambda a: a.sigmoid(), np_sigmoid, [np.array([-50.0, -30.0, -1.0, 0.0, 1.0, 30.0, 50.0])]),
    ("silu", lambda a: a.silu(), lambda a: a * np_sigmoid(a), [rand(3, 4)]),
    ("silu_large", lambda a: a.silu(), lambda a: a * np_sigmoid(a), [np.array([-50.0, -20.0, 0.5, 20.0, 50.0])]),
    # joining and splitting
    ("cat_axis0", lambda a, b, c: cat([a, b, c], axis=0) * np.arange(5.0),
     lambda a, b, c: np.concatenate([a, b, c], axis=0) * np.arange(5.0),
     [rand(1, 5), rand(3, 5, seed=1), rand(2, 5, seed=2)]),
    ("cat_axis_last", lambda a, b, c: cat([a, b, c], axis=-1), lambda a, b, c: np.concatenate([a, b, c], axis=-1),
     [rand(2, 3, 1), rand(2, 3, 4, seed=1), rand(2, 3, 2, seed=2)]),
    ("cat_same_tensor", lambda a: cat([a, a * 3.0, a], axis=0), lambda a: np.concatenate([a, a * 3.0, a], axis=0),
     [rand(2, 3)]),
    ("split_axis0", lambda a: cat([p * float(k + 1) for k, p in enumerate(split(a, [1, 2, 1], axis=0))][::-1], axis=0),
     lambda a: np.concatenate([a[3:4] * 3.0, a[1:3] * 2.0, a[0:1]], axis=0), [rand(4, 3)]),
]


@pytest.mark.parametrize("name,f,ref,arrays", CASES, ids=[c[0] for c in CASES])
def test_op_value_and_gradient(name, f, ref, arrays):
    check(f, ref, *arrays)


def test_split_last_axis_pieces_and_gradient():
    a = Tensor(rand(2, 6))
    pieces = split(a, [2, 1, 3], axis=-1)
    assert [p.shape for p in pieces] == [(2, 2), (2, 1), (2, 3)]
    np.testing.assert_array_equal(pieces[2].data, a.data[:, 3:])
    weights = [rand(2, 2, seed=1), rand(2, 1, seed=2), rand(2, 3, seed=3)]

    def f(a):
        p0, p1, p2 = split(a, [2, 1, 3], axis=-1)
        return (p0 * weights[0]).sum() + (p1.exp() * weights[1]).sum() + (p2 * p2 * weights[2]).sum()
    gradcheck(f, [a])
    a.grad = None
    f(a).backward()
    expected = np.concatenate([weights[0], np.exp(a.data[:, 2:3]) * weights[1], 2 * a.data[:, 3:] * weights[2]], -1)
    np.testing.assert_allclose(a.grad, expected, rtol=1e-12)


def test_split_pieces_with_another_consumer_of_the_input():
    """The pieces share one gradient buffer for x; when x has another consumer, whichever
    backward runs first, every contribution still arrives."""
    w = [rand(2, 2, seed=4), rand(2, 4, seed=5)]
    fs = [lambda a: (split(a, [2, 4])[0] * w[0]).sum() + (a * a).sum() + (split(a, [2, 4])[1] * w[1]).sum(),
          lambda a: (a * a).sum() + sum((p * q).sum() for p, q in zip(split(a * 1.0, [2, 4]), w)) + (a * 3.0).sum()]
    for f in fs:
        gradcheck(f, [Tensor(rand(2, 6))])


def test_linear_stack_is_the_linears_side_by_side():
    """[x W1^T, x W2^T + b2, x W3^T + b3] as one product: values and every gradient."""
    x, ws, bs = rand(2, 3, 4), [rand(5, 4, seed=1), rand(2, 4, seed=2), rand(3, 4, seed=3)], [None, rand(2), rand(3)]

    def stacked(x, w1, w2, w3, b2, b3):
        return linear_stack(x, [w1, w2, w3], [None, b2, b3])

    def separate(x, w1, w2, w3, b2, b3):
        return cat([linear(x, w1), linear(x, w2, b2), linear(x, w3, b3)])
    ins = [x, *ws, bs[1], bs[2]]
    check(stacked, lambda x, w1, w2, w3, b2, b3: np.concatenate([x @ w1.T, x @ w2.T + b2, x @ w3.T + b3], -1), *ins)
    grads = []
    for f in (stacked, separate):
        ts = [Tensor(a.copy(), requires_grad=True) for a in ins]
        f(*ts).backward(rand(2, 3, 10, seed=9))
        grads.append([t.grad for t in ts])
    for g, want in zip(*grads):
        np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-12)


def test_stacked_rows_reads_a_shared_buffer_without_a_copy():
    buf = rand(7, 3)
    parts = [buf[:2], buf[2:3], buf[3:]]
    assert stacked_rows(parts) is not buf and np.shares_memory(stacked_rows(parts), buf)
    np.testing.assert_array_equal(stacked_rows(parts), buf)
    for other in ([buf[:2], buf[3:]], [buf[2:3], buf[:2], buf[3:]], [buf[:2].copy(), buf[2:3], buf[3:]]):
        got = stacked_rows(other)  # not the buffer's rows in order: concatenated
        assert not np.shares_memory(got, buf)
        np.testing.assert_array_equal(got, np.concatenate(other))


def test_sigmoid_and_float32_exp_against_numpy():
    x = np.concatenate([np.linspace(-100, 100, 20001), [-np.inf, np.inf, 0.0]])
    np.testing.assert_allclose(sigmoid(x), np_sigmoid(x), rtol=1e-15, atol=0)   # float64: libm's exp
    x32 = x.astype(np.float32)
    s32 = sigmoid(x32)
    assert s32.dtype == np.float32
    np.testing.assert_allclose(s32, np_sigmoid(x32.astype(np.float64)), rtol=1e-6, atol=1e-38)
    assert np.isnan(sigmoid(np.array([np.nan], np.float32)))[0]
    # the float32 exp itself, through the cross-entropy kernel's e = exp(z - max z)
    z = np.linspace(-87.3, 0, 4001, dtype=np.float32).reshape(1, -1)
    e, total, row = np.empty_like(z), np.empty(1, np.float32), np.empty(1, np.float32)
    autograd.cross_entropy_forward_kernel(z, np.array([0]), e, total, row)
    np.testing.assert_allclose(e, np.exp(z.astype(np.float64)), rtol=5e-7, atol=0)


def test_cross_entropy_refuses_targets_outside_the_vocabulary():
    for bad in ([0, 1, 4], [0, -1, 2]):
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\)"):
            cross_entropy(Tensor(rand(3, 4)), bad)


def test_split_sizes_must_add_up():
    with pytest.raises(ValueError, match="do not add up"):
        split(Tensor(rand(2, 6)), [2, 3], axis=-1)


def test_transpose_negative_axes():
    """NumPy allows negative entries in a permutation: (0, -1, 1) is (0, 2, 1)."""
    check(lambda a: a.transpose(0, -1, 1) * np.arange(1.0, 4.0), lambda a: a.transpose(0, -1, 1) * np.arange(1.0, 4.0),
          rand(2, 3, 4))


def test_transpose_accepts_an_axes_tuple_like_numpy():
    """ndarray.transpose (and Tensor.reshape) accept the axes as varargs or as one tuple."""
    check(lambda a: a.transpose((1, 0, 2)) * np.arange(5.0), lambda a: a.transpose((1, 0, 2)) * np.arange(5.0),
          rand(3, 4, 5))


def test_index_repeated_gradient_is_summed():
    x = Tensor(rand(3, 4), requires_grad=True)
    G = rand(5, 4, seed=1)
    x[[0, 2, 0, 0, 1]].backward(G)
    np.testing.assert_allclose(x.grad[0], G[0] + G[2] + G[3], rtol=1e-12)
    np.testing.assert_allclose(x.grad[2], G[1], rtol=1e-12)
    np.testing.assert_allclose(x.grad[1], G[4], rtol=1e-12)


def test_matmul_rejects_1d():
    with pytest.raises(ValueError, match="matmul"):
        Tensor(rand(3, 4)) @ Tensor(rand(4))


# ---------------------------------------------------------------------------
# fused ops


def test_embedding_gradient_of_repeated_ids_is_the_sum():
    ids = np.array([[1, 3, 1], [1, 0, 5]])
    W = rand(6, 4)
    check(lambda w: embedding(w, ids), lambda w: w[ids], W)
    w = Tensor(W, requires_grad=True)
    G = rand(2, 3, 4, seed=1)
    embedding(w, ids).backward(G)
    np.testing.assert_allclose(w.grad[1], G[0, 0] + G[0, 2] + G[1, 0], rtol=1e-12)
    np.testing.assert_allclose(w.grad[3], G[0, 1], rtol=1e-12)
    assert np.all(w.grad[[2, 4]] == 0)


def test_linear_with_bias_3d():
    check(lambda x, w, b: linear(x, w, b), lambda x, w, b: x @ w.T + b, rand(2, 3, 5), rand(4, 5, seed=1), rand(4, seed=2))


def test_linear_without_bias_3d():
    check(lambda x, w: linear(x, w), lambda x, w: x @ w.T, rand(2, 3, 5), rand(4, 5, seed=1))


def test_rmsnorm_odd_width_nontrivial_weight():
    eps = 1e-6
    w = 1.0 + 0.5 * rand(7, seed=1)
    check(lambda x, w: rmsnorm(x, w, eps), lambda x, w: np_rmsnorm(x, w, eps), rand(2, 3, 7), w)


def test_rmsnorm_value_float32():
    x = (rand(4, 7) * 3).astype(np.float32)
    w = (1.0 + rand(7, seed=1)).astype(np.float32)
    y = rmsnorm(Tensor(x), Tensor(w), 1e-5)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.data, np_rmsnorm(x.astype(np.float64), w.astype(np.float64), 1e-5), rtol=1e-5)
    # the eps matters for a row of zeros: 0 / sqrt(eps), not nan
    z = rmsnorm(Tensor(np.zeros((1, 7), np.float32)), Tensor(w), 1e-5)
    assert np.all(z.data == 0)


def test_swiglu():
    # h = [a | b]: silu(a) * b
    check(swiglu, lambda h: h[..., :5] * np_sigmoid(h[..., :5]) * h[..., 5:], rand(2, 3, 10))


def test_cross_entropy_gradient_no_mask():
    t = np.array([0, 4, 2, 2, 1])
    check(lambda z: cross_entropy(z, t), lambda z: -np_log_softmax(z)[np.arange(5), t].mean(), rand(5, 6))


def test_cross_entropy_gradient_with_mask_and_masked_rows_get_zero():
    t = np.array([0, 4, 2, 2, 1])
    m = np.array([1, 0, 1, 0, 1])

    def ref(z):
        return -(np_log_softmax(z)[np.arange(5), t] * m).sum() / m.sum()
    check(lambda z: cross_entropy(z, t, m), ref, rand(5, 6))
    z = Tensor(rand(5, 6), requires_grad=True)
    (cross_entropy(z, t, m) * 3.0).backward()
    assert np.all(z.grad[m == 0] == 0.0)
    assert np.all(np.abs(z.grad[m == 1]).sum(axis=1) > 0)
    # each unmasked row's gradient is 3 (softmax - onehot) / 3
    p = np.exp(np_log_softmax(z.data))
    p[np.arange(5), t] -= 1
    np.testing.assert_allclose(z.grad[m == 1], p[m == 1], rtol=1e-12)


def test_cross_entropy_value_matches_numpy_log_softmax():
    z = rand(6, 11) * 4
    t = np.array([3, 0, 10, 3, 7, 1])
    m = np.array([1, 1, 0, 1, 0, 1])
    logp = np_log_softmax(z)
    assert cross_entropy(Tensor(z), t).item() == pytest.approx(-logp[np.arange(6), t].mean(), rel=1e-12)
    assert cross_entropy(Tensor(z), t, m).item() == pytest.approx(-(logp[np.arange(6), t] * m).sum() / 4, rel=1e-12)
    # targets may come as [B, T] and the mask as [B, T]
    assert cross_entropy(Tensor(z), t.reshape(2, 3), m.reshape(2, 3)).item() == pytest.approx(
        -(logp[np.arange(6), t] * m).sum() / 4, rel=1e-12)


def test_cross_entropy_large_logits_no_overflow():
    z = np.array([[1000.0, 0.0, -1000.0], [1000.0, 999.0, 0.0], [-1000.0, -1000.0, -1000.0]], dtype=np.float32)
    t = np.array([2, 1, 0])
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        zt = Tensor(z, requires_grad=True)
        loss = cross_entropy(zt, t)
        loss.backward()
    # row 0: 2000; row 1: log(1 + e) ; row 2: log 3
    expected = (2000.0 + np.log1p(np.e) + np.log(3.0)) / 3
    assert loss.dtype == np.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert np.all(np.isfinite(zt.grad))
    np.testing.assert_allclose(zt.grad.sum(axis=1), 0.0, atol=1e-6)  # softmax - onehot sums to 0
    np.testing.assert_allclose(zt.grad[0], np.array([1.0, 0.0, -1.0]) / 3, atol=1e-7)


def test_cross_entropy_errors():
    with pytest.raises(ValueError, match="targets"):
        cross_entropy(Tensor(rand(3, 4)), [0, 1])
    with pytest.raises(ValueError, match="masked"):
        cross_entropy(Tensor(rand(3, 4)), [0, 1, 2], [0, 0, 0])


def test_sigmoid_value_and_no_overflow_warnings():
    x = np.linspace(-8, 8, 33)
    np.testing.assert_allclose(Tensor(x).sigmoid().data, 1.0 / (1.0 + np.exp(-x)), rtol=1e-13)
    big = np.array([-1000.0, -50.0, 50.0, 1000.0])
    for dtype in (np.float32, np.float64):
        with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
            warnings.simplefilter("error")
            t = Tensor(big.astype(dtype), requires_grad=True)
            y = t.sigmoid()
            (y.sum() + t.silu().sum()).backward()
        assert y.dtype == dtype
        assert y.data[2] == 1.0 and y.data[3] == 1.0 and y.data[0] == 0.0
        assert np.all(np.isfinite(t.grad))
    # absolute accuracy over the whole range, in both precisions
    x = np.linspace(-60, 60, 481)
    exact = np.exp(-np.logaddexp(0.0, -x))
    np.testing.assert_allclose(Tensor(x).sigmoid().data, exact, rtol=0, atol=1e-15)
    np.testing.assert_allclose(Tensor(x.astype(np.float32)).sigmoid().data, exact, rtol=0, atol=1.5e-7)
    # a 0-d input, and a non-contiguous one, keep their shapes
    assert Tensor(np.array(2.0)).sigmoid().data == pytest.approx(1 / (1 + np.exp(-2.0)), rel=1e-14)
    xt = rand(4, 6).T
    np.testing.assert_allclose(Tensor(xt).sigmoid().data, 1 / (1 + np.exp(-xt)), rtol=1e-13)


# ---------------------------------------------------------------------------
# gradcheck itself


def test_gradcheck_catches_a_wrong_gradient():
    def square_missing_2(x):  # d(x^2) = 2x dx, but the backward forgets the 2
        return Tensor.make(x.data ** 2, (x,), lambda g: x._acc(g * x.data))

    def add_wrong_sign(a, b):
        return Tensor.make(a.data + b.data, (a, b), lambda g: (a._acc(g), b._acc(-g)))

    with pytest.raises(AssertionError, match="gradcheck"):
        gradcheck(square_missing_2, [Tensor(rand(3, 4))])
    with pytest.raises(AssertionError, match="input 1"):
        gradcheck(add_wrong_sign, [Tensor(rand(3)), Tensor(rand(3, seed=1))])
    # and the correct versions pass
    assert gradcheck(lambda x: Tensor.make(x.data ** 2, (x,), lambda g: x._acc(2 * g * x.data)), [Tensor(rand(3, 4))]) <= 1


def test_gradcheck_catches_a_gradient_that_cancels_over_a_row():
    """A wrong rmsnorm backward that differs by a per-row constant: invisible with an
    all-ones upstream gradient, caught by gradcheck's random one."""
    def bad_centre(x):
        y = x.data - x.data.mean(axis=-1, keepdims=True)
        return Tensor.make(y, (x,), lambda g: x._acc(g.copy()))  # forgot the "- mean(g)"
    with pytest.raises(AssertionError):
        gradcheck(bad_centre, [Tensor(rand(3, 5))])


def test_gradcheck_catches_a_gradient_of_the_wrong_shape():
    """x [5] -> x[None] [1, 5] whose backward forgets to reshape: every value is right
    but x.grad is [1, 5], which breaks an optimizer's `p.data -= lr * p.grad`."""
    def unsqueeze_no_reshape(x):
        return Tensor.make(x.data[None], (x,), lambda g: x._acc(g))
    with pytest.raises(AssertionError):
        gradcheck(unsqueeze_no_reshape, [Tensor(rand(5))])


def test_gradcheck_on_a_non_contiguous_input():
    """A transposed array as input: t.data.reshape(-1) is then a copy, not a view, so
    gradcheck must not perturb that copy (its numeric gradient would be all zeros)."""
    assert gradcheck(lambda x: x * 2.0, [Tensor(rand(4, 3).T)]) <= 1  # a correct op passes
    with pytest.raises(AssertionError):  # an op that forgets its gradient fails
        gradcheck(lambda x: Tensor.make(x.data * 2.0, (x,), lambda g: None), [Tensor(rand(4, 3).T)])


def test_gradcheck_requires_float64():
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda x: x * 2.0, [Tensor(rand(3).astype(np.float32))])


# ---------------------------------------------------------------------------
# the engine


def test_no_grad_builds_no_graph():
    x = Tensor(rand(3, 4), requires_grad=True)
    y_before = x * 3.0  # a graph built before the block
    with no_grad():
        y = (x * 2.0 + x.exp()).sum()
        z = linear(x, Tensor(rand(2, 4), requires_grad=True))
    for t in (y, z):
        assert t.requires_grad is False
        assert t._parents == () and t._backward is None
    y.backward()  # backward on a no-grad result reaches nothing
    assert x.grad is None
    # after the block: ops build graphs again, and the earlier graph still works
    w = (x * x).sum()
    assert w.requires_grad and w._parents
    w.backward()
    y_before.sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 3.0, rtol=1e-12)


def test_no_grad_restored_after_exception_and_nesting():
    x = Tensor(rand(3), requires_grad=True)
    with pytest.raises(RuntimeError, match="boom"):
        with no_grad():
            assert (x * 2.0).requires_grad is False
            raise RuntimeError("boom")
    assert autograd._grad_enabled is True
    assert (x * 2.0).requires_grad is True
    with no_grad():
        with no_grad():
            pass
        assert (x * 2.0).requires_grad is False  # leaving the inner block keeps grad off
    assert (x * 2.0).requires_grad is True


def test_graph_released_after_backward():
    x = Tensor(rand(3, 4), requires_grad=True)
    w = Tensor(rand(4, seed=1), requires_grad=True)
    h = (x * w).exp()
    m = h.sigmoid()
    loss = (m * h).mean()
    ref_h, ref_m = weakref.ref(h), weakref.ref(m)
    loss.backward()
    for t in (h, m, loss):
        assert t._parents == () and t._backward is None and t.grad is None
    assert x.grad is not None and w.grad is not None  # leaf gradients are kept
    del h, m
    # loss is still alive but no longer holds its inputs: no gc needed, no cycles
    assert ref_h() is None and ref_m() is None
    assert loss.item() > 0


def test_intermediates_are_freed_without_the_cycle_collector():
    gc.disable()
    try:
        x = Tensor(rand(5, 3), requires_grad=True)
        W = Tensor(rand(2, 3, seed=1), requires_grad=True)
        y = linear(rmsnorm(x, Tensor(np.ones(3)), 1e-6), W)
        refs = [weakref.ref(y)]
        loss = cross_entropy(y, [0, 1, 1, 0, 1])
        del y
        assert refs[0]() is not None  # still held by the graph before backward
        loss.backward()
        assert refs[0]() is None
    finally:
        gc.enable()


def _training_setup(seed=0):
    rng = np.random.default_rng(seed)
    V, d, f = 11, 8, 16
    p = lambda *s: Tensor(rng.standard_normal(s).astype(np.float32) * 0.3, requires_grad=True)  # noqa: E731
    params = {"E": p(V, d), "n": Tensor(np.ones(d, np.float32), requires_grad=True),
              "W1": p(2 * f, d), "W2": p(d, f), "b2": p(d)}
    ids = rng.integers(0, V, (2, 5))
    targets = rng.integers(0, V, (2, 5))
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    mask[0, 0] = 1

    def step():
        h = embedding(params["E"], ids)                           # [2, 5, d]
        h = h + linear(swiglu(linear(rmsnorm(h, params["n"], 1e-6), params["W1"])), params["W2"], params["b2"])
        logits = h @ params["E"].transpose()                       # [2, 5, V], folded matmul
        loss = cross_entropy(logits.reshape(-1, V), targets, mask)
        loss.backward()
        for t in params.values():
            t.data -= 0.05 * t.grad
            t.grad = None
        return loss.item()
    return step


def test_training_steps_do_not_grow_memory():
    step = _training_setup()
    first = step()
    for _ in range(20):  # warm up caches
        step()
    gc.collect()
    gc.disable()  # measure without the cycle collector: a cycle would show up as growth
    try:
        tracemalloc.start()
        for _ in range(10):  # first traced steps fill tracemalloc's own tables
            step()
        base, _ = tracemalloc.get_traced_memory()
        n_objects = len(gc.get_objects())
        for _ in range(200):
            last = step()
        current, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        grown = len(gc.get_objects()) - n_objects
    finally:
        gc.enable()
    assert last < first  # it did train
    assert grown < 50, f"{grown} more live objects after 200 steps"
    assert current - base < 32 * 1024, f"traced memory grew by {current - base} bytes over 200 steps"


def test_gradient_accumulates_over_two_backward_calls():
    x = Tensor(rand(3, 4), requires_grad=True)
    w = Tensor(rand(3, 4, seed=1), requires_grad=True)
    (x * 2.0).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, 2.0 + 2 * x.data, rtol=1e-12)
    # the leaves of x + w must get separate gradient buffers, and an upstream
    # gradient passed to backward() must never be written into
    x.grad = None
    G = rand(3, 4, seed=2)
    G0 = G.copy()
    (x + w).backward(G)
    (x + w).backward(G)
    assert not np.shares_memory(x.grad, w.grad)
    np.testing.assert_array_equal(x.grad, 2 * G0)
    np.testing.assert_array_equal(w.grad, 2 * G0)
    np.testing.assert_array_equal(G, G0)
    c = Tensor(rand(3, 4, seed=3))  # a constant: never gets a gradient
    (x * c + c).sum().backward()
    assert c.grad is None
    np.testing.assert_allclose(x.grad, 2 * G0 + c.data, rtol=1e-12)


def test_backward_needs_a_scalar_or_a_grad():
    x = Tensor(rand(3), requires_grad=True)
    with pytest.raises(ValueError, match="scalar"):
        (x * 2.0).backward()


def test_deep_graph_does_not_hit_the_recursion_limit():
    x = Tensor(np.array([1.0]), requires_grad=True)
    y = x
    for _ in range(sys.getrecursionlimit() + 500):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 1.0001 ** (sys.getrecursionlimit() + 500), rtol=1e-9)


def test_float32_preserved_through_ops():
    assert Tensor(np.arange(3)).dtype == np.float32  # integers become float32
    x = Tensor(pos(3, 4).astype(np.float32), requires_grad=True)
    w = Tensor(np.ones(4, np.float32), requires_grad=True)
    exprs = {
        "x + 1": lambda: x + 1, "1.5 + x": lambda: 1.5 + x, "x - 2.5": lambda: x - 2.5, "2 - x": lambda: 2 - x,
        "x * 3.0": lambda: x * 3.0, "3 * x": lambda: 3 * x, "x / 2.0": lambda: x / 2.0, "3 / x": lambda: 3 / x,
        "x ** 2": lambda: x ** 2, "x ** 0.5": lambda: x ** 0.5, "-x": lambda: -x,
        "x * np.float64": lambda: x * np.float64(2.0), "x + f64 array": lambda: x + np.ones(4),
        "mean": lambda: x.mean(axis=0), "sum": lambda: x.sum(), "exp": lambda: x.exp(), "log": lambda: x.log(),
        "sqrt": lambda: x.sqrt(), "sigmoid": lambda: x.sigmoid(), "silu": lambda: x.silu(),
        "matmul": lambda: x @ x.transpose(), "index": lambda: x[[0, 0]], "cat": lambda: cat([x, x], 0),
        "rmsnorm": lambda: rmsnorm(x, w, 1e-6), "swiglu": lambda: swiglu(x), "linear": lambda: linear(x, x),
        "cross_entropy": lambda: cross_entropy(x, [0, 1, 2]), "embedding": lambda: embedding(x, [[0, 2]]),
    }
    for name, f in exprs.items():
        x.grad = None
        y = f()
        assert y.dtype == np.float32, name
        y.backward(np.ones(y.shape, np.float32))
        assert x.grad.dtype == np.float32, name
