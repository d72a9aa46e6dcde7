"""Each Numba kernel against a plain NumPy version of the same maths (to 1e-10
in float64), and each kernel's differentiable op against finite differences."""
import numpy as np
import pytest

from autograd import Tensor, gradcheck
from rglru_reference import rglru_decay, rglru_input, rglru_scan
from wyrd import rglru, rope, rope_angles, window_attention

rng = np.random.default_rng(1234)


# -- plain NumPy references -------------------------------------------------------
def rope_ref(x, positions, theta):
    D = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, D, 2) / D)
    angle = np.concatenate([np.outer(positions, inv_freq)] * 2, axis=1)   # [T, D]
    cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
    rotate_half = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], axis=-1)
    return x * cos + rotate_half * sin


def scan_ref(a, u, h0):
    h = np.empty_like(a)
    prev = h0
    for t in range(a.shape[1]):
        prev = a[:, t] * prev + u[:, t]
        h[:, t] = prev
    return h


def scan_backward_ref(a, h, h0, gh):
    du, da = np.empty_like(a), np.empty_like(a)
    g_next = np.zeros_like(h0)
    for t in reversed(range(a.shape[1])):
        g = gh[:, t] + (a[:, t + 1] * g_next if t + 1 < a.shape[1] else 0)
        du[:, t] = g
        da[:, t] = g * (h[:, t - 1] if t > 0 else h0)
        g_next = g
    return du, da, du[:, 0] * a[:, 0]


def attention_ref(q, k, v, W):
    """Dense masked attention with a [Tq, Tk] score matrix (what the kernel avoids)."""
    B, Tq, H, D = q.shape
    Tk, KV = k.shape[1], k.shape[2]
    kr = np.repeat(k, H // KV, axis=2)                      # query head h reads kv head h // (H/KV)
    vr = np.repeat(v, H // KV, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, kr) / np.sqrt(D)
    i = np.arange(Tq)[:, None] + (Tk - Tq)
    j = np.arange(Tk)[None, :]
    allowed = (j <= i) & (j > i - W)
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, vr), p, kr, vr


def attention_backward_ref(q, k, v, W, g):
    B, Tq, H, D = q.shape
    KV = k.shape[2]
    out, p, kr, vr = attention_ref(q, k, v, W)
    dvr = np.einsum("bhts,bthd->bshd", p, g)
    dp = np.einsum("bthd,bshd->bhts", g, vr)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(D)
    dq = np.einsum("bhts,bshd->bthd", ds, kr)
    dkr = np.einsum("bhts,bthd->bshd", ds, q)
    fold = lambda x: x.reshape(B, x.shape[1], KV, H // KV, D).sum(3)  # sum the heads sharing a kv head
    return dq, fold(dkr), fold(dvr)


def randn(*shape):
    return rng.standard_normal(shape)


# -- RoPE ---------------------------------------------------------------------------
@pytest.mark.parametrize("positions", [np.arange(7), np.arange(100_000, 100_005)])
def test_rope_matches_numpy(positions):
    x = randn(2, len(positions), 3, 8)
    cos, sin = rope_angles(positions, 8, 10000.0, np.float64)
    np.testing.assert_allclose(rope(Tensor(x), cos, sin).data, rope_ref(x, positions, 10000.0), rtol=0, atol=1e-10)


def test_rope_backward_is_inverse_rotation():
    x = randn(2, 5, 3, 8)
    cos, sin = rope_angles(np.arange(5), 8, 10000.0, np.float64)
    gradcheck(lambda t: rope(t, cos, sin), [Tensor(x)])
    # rotating then applying the backward (the inverse rotation) returns the input
    t = Tensor(x, requires_grad=True)
    y = rope(t, cos, sin)
    y.backward(y.data)
    np.testing.assert_allclose(t.grad, x, atol=1e-12)


# -- RG-LRU scan ----------------------------------------------------------------------
@pytest.mark.parametrize("B,T,d", [(1, 1, 3), (2, 9, 5), (3, 17, 130)])
def test_scan_matches_numpy(B, T, d):
    a, u, h0 = rng.uniform(0, 1, (B, T, d)), randn(B, T, d), randn(B, d)
    h = rglru_scan(Tensor(a, requires_grad=True), Tensor(u, requires_grad=True), Tensor(h0, requires_grad=True))
    np.testing.assert_allclose(h.data, scan_ref(a, u, h0), rtol=0, atol=1e-10)
    gh = randn(B, T, d)
    ta, tu, th0 = (Tensor(x, requires_grad=True) for x in (a, u, h0))
    rglru_scan(ta, tu, th0).backward(gh)
    du, da, dh0 = scan_backward_ref(a, scan_ref(a, u, h0), h0, gh)
    for got, want in ((tu.grad, du), (ta.grad, da), (th0.grad, dh0)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("h0_shape", [(2, 4), (1, 1, 4)])
def test_scan_gradcheck(h0_shape):
    """Nonzero h0, both as a per-row state [B, d] and as the learned [1, 1, d]."""
    a, u, h0 = rng.uniform(0.1, 1, (2, 6, 4)), randn(2, 6, 4), randn(*h0_shape)
    gradcheck(rglru_scan, [Tensor(a), Tensor(u), Tensor(h0)])


# -- RG-LRU gates -----------------------------------------------------------------------
def sig(x):
    return 1 / (1 + np.exp(-x))


def test_decay_and_input_gates_match_numpy():
    z, lam, zi, xp = randn(2, 5, 7), rng.uniform(-2, 9, 7), randn(2, 5, 7), randn(2, 5, 7)
    a = rglru_decay(Tensor(z), Tensor(lam), 8.0).data
    a_ref = np.exp(8.0 * sig(z) * np.log(sig(lam) + 1e-8))
    np.testing.assert_allclose(a, a_ref, rtol=1e-12)
    u = rglru_input(Tensor(a_ref), Tensor(zi), Tensor(xp)).data
    np.testing.assert_allclose(u, np.sqrt(1 - a_ref ** 2 + 1e-6) * sig(zi) * xp, rtol=1e-12)


def test_decay_and_input_gates_gradcheck():
    # lambda down to -2 so sigmoid(lambda) is far from 1 and its gradient is not tiny
    z, lam = randn(2, 5, 7), rng.uniform(-2, 9, 7)
    gradcheck(lambda a, b: rglru_decay(a, b, 8.0), [Tensor(z), Tensor(lam)])
    a = rng.uniform(0.05, 0.95, (2, 5, 7))
    gradcheck(rglru_input, [Tensor(a), Tensor(randn(2, 5, 7)), Tensor(randn(2, 5, 7))])


# -- the fused RG-LRU (gates and scan in one kernel each way) ----------------------------
def rglru_plain(y, lam, h0, c):
    """The same maths through the three plain ops: the reference of the fused kernels."""
    d = y.shape[-1] // 3
    xp, zi, zr = y[..., :d], y[..., d:2 * d], y[..., 2 * d:]
    a = rglru_decay(zr, lam, c)
    return rglru_scan(a, rglru_input(a, zi, xp), h0)


@pytest.mark.parametrize("B,T,d,h0_shape", [(1, 1, 3, (1, 1, 3)), (2, 9, 5, (2, 5)), (3, 17, 300, (1, 1, 300))])
def test_fused_rglru_matches_the_plain_ops(B, T, d, h0_shape):
    """Values and every gradient to 1e-10 in float64 (300 channels: two channel blocks)."""
    y, lam, h0, gh = randn(B, T, 3 * d), rng.uniform(-2, 9, d), randn(*h0_shape), randn(B, T, d)
    got, want = [], []
    for op, out in ((rglru, got), (rglru_plain, want)):
        ins = [Tensor(v.copy(), requires_grad=True) for v in (y, lam, h0)]
        h = op(ins[0], ins[1], ins[2], 8.0)
        h.backward(gh)
        out += [h.data] + [t.grad for t in ins]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)


def test_fused_rglru_float32_matches_float64():
    y, lam, h0 = randn(2, 40, 3 * 64), rng.uniform(-2, 9, 64), randn(1, 1, 64)
    h64 = rglru(Tensor(y), Tensor(lam), Tensor(h0), 8.0).data
    h32 = rglru(Tensor(y.astype(np.float32)), Tensor(lam.astype(np.float32)), Tensor(h0.astype(np.float32)), 8.0)
    assert h32.dtype == np.float32
    np.testing.assert_allclose(h32.data, h64, rtol=1e-4, atol=1e-5)


def test_fused_rglru_does_not_depend_on_where_its_arrays_lie():
    """Bit-identical values and gradients for inputs at every offset in memory: a
    vectorised loop and its scalar remainder must round alike, or a run would not repeat."""
    y, lam, h0, gh = (v.astype(np.float32) for v in (randn(1, 20, 192), rng.uniform(-2, 9, 64), randn(1, 1, 64),
                                                       randn(1, 20, 64)))
    results, pads = set(), []
    for offset in range(32):
        pads.append(np.empty(offset + 1, np.float32))  # moves where the kernel's own arrays land
        y2 = np.empty(y.size + 16, np.float32)[offset % 16:offset % 16 + y.size].reshape(y.shape)
        y2[...] = y
        t = Tensor(y2, requires_grad=True)
        h = rglru(t, Tensor(lam), Tensor(h0), 8.0)
        h.backward(gh)
        results.add((h.data.tobytes(), t.grad.tobytes()))
    assert len(results) == 1


def test_fused_rglru_gradcheck():
    y, lam, h0 = randn(2, 6, 12), rng.uniform(-2, 9, 4), randn(1, 1, 4)
    gradcheck(lambda a, b, c: rglru(a, b, c, 8.0), [Tensor(y), Tensor(lam), Tensor(h0)])


# -- sliding-window attention ----------------------------------------------------------
CASES = [  # B, T, H, KV, D, W: T < W, T = W, T > 3W, KV < H, KV = H, batch > 1
    (1, 5, 2, 2, 4, 8),
    (2, 8, 4, 2, 6, 8),
    (2, 27, 4, 1, 4, 6),
    (1, 13, 3, 3, 2, 1),
]


def check_attention_against_numpy(q, k, v, W):
    """Kernel forward and backward (random upstream gradient) equal the dense NumPy twin."""
    tq, tk, tv = (Tensor(x, requires_grad=True) for x in (q, k, v))
    out = window_attention(tq, tk, tv, W)
    np.testing.assert_allclose(out.data, attention_ref(q, k, v, W)[0], rtol=0, atol=1e-10)
    g = randn(*q.shape)
    out.backward(g)
    for got, want in zip((tq.grad, tk.grad, tv.grad), attention_backward_ref(q, k, v, W, g)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("B,T,H,KV,D,W", CASES)
def test_attention_matches_numpy(B, T, H, KV, D, W):
    check_attention_against_numpy(randn(B, T, H, D), randn(B, T, KV, D), randn(B, T, KV, D), W)


def test_attention_queries_after_cached_keys():
    """Decoding feeds Tq new queries against Tk >= Tq keys (cache first)."""
    B, Tq, Tk, H, KV, D, W = 2, 3, 10, 4, 2, 4, 5
    check_attention_against_numpy(randn(B, Tq, H, D), randn(B, Tk, KV, D), randn(B, Tk, KV, D), W)


@pytest.mark.parametrize("B,T,H,KV,D,W", CASES)
def test_attention_gradcheck(B, T, H, KV, D, W):
    q, k, v = randn(B, T, H, D), randn(B, T, KV, D), randn(B, T, KV, D)
    gradcheck(lambda a, b, c: window_attention(a, b, c, W), [Tensor(q), Tensor(k), Tensor(v)], samples=40)


def test_attention_window_limits_what_a_query_sees():
    """Changing a key outside every window must not change any output."""
    B, T, H, KV, D, W = 1, 12, 2, 1, 4, 4
    q, k, v = randn(B, T, H, D), randn(B, T, KV, D), randn(B, T, KV, D)
    base = window_attention(Tensor(q), Tensor(k), Tensor(v), W).data
    k2, v2 = k.copy(), v.copy()
    k2[:, 0] += 5.0
    v2[:, 0] += 5.0  # key 0 is visible to queries 0..W-1 only
    moved = window_attention(Tensor(q), Tensor(k2), Tensor(v2), W).data
    np.testing.assert_array_equal(moved[:, W:], base[:, W:])
    assert np.abs(moved[:, :W] - base[:, :W]).max() > 1e-3


def test_attention_float32_close_to_float64():
    q, k, v = randn(2, 40, 4, 16), randn(2, 40, 2, 16), randn(2, 40, 2, 16)
    f64 = window_attention(Tensor(q), Tensor(k), Tensor(v), 16).data
    f32 = window_attention(*(Tensor(x.astype(np.float32)) for x in (q, k, v)), 16).data
    assert f32.dtype == np.float32
    np.testing.assert_allclose(f32, f64, atol=1e-5)


# -- the same bits however the kernels were compiled ---------------------------------
def test_dot_and_lane_sum_add_in_lanes_of_16_then_in_order():
    """The order is part of the maths: LANES partial sums, added first to last, then the tail."""
    from numba import njit
    from autograd import LANES, dot, lane_sum

    @njit
    def both(a, b):
        lanes = np.empty(LANES, a.dtype)
        return dot(a, b, lanes), lane_sum(a, lanes)

    for n in (0, 5, 16, 50, 1000):
        a, b = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
        m = n - n % LANES
        parts = np.zeros(LANES, np.float32)
        for j0 in range(0, m, LANES):
            parts = parts + a[j0:j0 + LANES] * b[j0:j0 + LANES]   # the kernel may fuse these: within rounding
        ref = np.float32(0)
        for v in list(parts) + list(a[m:] * b[m:]):
            ref = np.float32(ref + v)
        got_dot, got_sum = both(a, b)
        assert abs(got_dot - ref) <= 1e-6 * np.abs(a * b).sum() + 1e-30
        lanes = np.zeros(LANES, np.float32)
        for j0 in range(0, m, LANES):
            lanes = lanes + a[j0:j0 + LANES]
        ref_sum = np.float32(0)
        for v in list(lanes) + list(a[m:]):
            ref_sum = np.float32(ref_sum + v)
        assert got_sum == ref_sum   # additions only: the exact same bits


CHILD = """
import hashlib, json, sys
import numpy as np
import train, wyrd
from autograd import no_grad
cfg = wyrd.ChimeraConfig(vocab_size=300, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, sliding_window=16,
                         max_seq_len=64)
model = wyrd.Chimera(cfg)
opt = train.AdamW(model.named_parameters())
rng = np.random.default_rng(0)
x, y = rng.integers(0, 300, (2, 40)), rng.integers(0, 300, (2, 40))
out = {}
for step in range(2):
    loss = model.loss(x, y)
    loss.backward()
    out[f"loss{step}"] = float(loss.data)
    out[f"norm{step}"] = train.clip_grad_norm(model.parameters(), 0.01)
    opt.step(1e-2)
    for p in model.parameters():
        p.grad = None
with no_grad():
    out["eval"] = float(model.loss(x, y).data)
out["weights"] = hashlib.sha256(b"".join(p.data.tobytes() for p in model.parameters())).hexdigest()
print(json.dumps(out))
"""


def test_a_training_step_gives_the_same_bits_compiled_fresh_or_loaded_from_numbas_cache(tmp_path):
    """A process that compiles the kernels and one that loads them from Numba's cache must
    train alike, or a run resumed on a fresh clone drifts from the uninterrupted one (a
    reassociated sum in a parallel kernel rounded differently in the two). Its own cache
    folder, so the first child compiles whatever the repository's cache holds."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), PYTHONPATH=root)
    runs = [subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=root, capture_output=True, text=True,
                           timeout=600) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert list((tmp_path / "numba").rglob("*.nbc")), "the first child wrote no cache"
    fresh, cached = (json.loads(r.stdout) for r in runs)
    assert fresh["norm0"] > 0.01            # clipping ran (sum_squares), and the update moved the weights
    assert fresh == cached
