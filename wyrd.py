"""Wyrd: the Chimera hybrid recurrent/attention language model in NumPy and Numba.

Read top to bottom, in the order a token flows: the configuration and presets;
Linear and RMSNorm; the token embedding; RoPE; the RG-LRU recurrence; sliding-window
GQA attention; the SwiGLU feed-forward and the residual block; the model; O(1)-state
decoding. Each section runs in one order: the Numba kernels, the differentiable op
that wraps them (forward and backward together), then the layer. Equations and names
are docs/architecture.md's. The kernels are the model's maths, so they live here and
not in autograd.py, the general engine; rglru_reference.py has the RG-LRU as three
plain ops, checkpoint.py reads and writes files, quant.py holds everything int8.
"""
import contextlib
import copy
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import numba
from numba import njit, prange

from autograd import (FAST, LANES, Tensor, cat, cross_entropy, dot, embedding, exp, is_grad_enabled, lane_sum,
                      linear, linear_stack, no_grad, rmsnorm, sigmoid_scalar, split, swiglu)
from tensorfile import shape_mismatch


# ---------------------------------------------------------------------------
# Configuration


# Upper bounds far beyond any preset, so that a crafted config is refused before it
# sizes an array (a 2**40-token window would be a 2**40-slot decoding ring)
LIMITS = {"vocab_size": 1 << 21, "d_model": 1 << 16, "n_layers": 1 << 10, "n_heads": 1 << 10,
          "n_kv_heads": 1 << 10, "sliding_window": 1 << 20, "max_seq_len": 1 << 20}


@dataclass(frozen=True)
class ChimeraConfig:
    vocab_size: int = 32000
    d_model: int = 1024
    n_layers: int = 16
    n_heads: int = 16
    n_kv_heads: int = 4
    sliding_window: int = 512      # W: keys a query may see, itself included
    max_seq_len: int = 8192        # training context (decoding may run past it)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_every_n: int = 3     # layer i is attention iff (i + 1) % n == 0; 0 = never
    tie_word_embeddings: bool = True
    c: float = 8.0                 # RG-LRU gate sharpness

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self):
        return math.ceil(int(self.d_model * 8 / 3) / 256) * 256

    def is_attention(self, i):
        n = self.attention_every_n
        return n > 0 and (i + 1) % n == 0

    def __post_init__(self):
        problems = []
        for f, most in LIMITS.items():
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 1 <= v <= most:
                problems.append(f"{f} must be an integer in [1, {most:,}], got {v!r}")
        if not problems:
            if self.d_model % self.n_heads:
                problems.append(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
            elif self.head_dim % 2:
                problems.append(f"head_dim {self.head_dim} must be even for RoPE")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if not isinstance(self.attention_every_n, int) or self.attention_every_n < 0:
            problems.append(f"attention_every_n must be an integer >= 0, got {self.attention_every_n!r}")
        for f in ("rms_norm_eps", "rope_theta", "c"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < math.inf:
                problems.append(f"{f} must be a positive finite number, got {v!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            problems.append(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if problems:
            raise ValueError("invalid ChimeraConfig: " + "; ".join(problems))

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**d)


PRESETS = {
    # ours, for CPUs: nano for tests and quick runs; micro for the default training run
    # (on the built-in corpus half tiny's width learns to copy names in 40% of the time:
    # docs/architecture.md); tiny for real TinyStories text
    "nano": ChimeraConfig(vocab_size=512, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
                          sliding_window=16, max_seq_len=128),
    "micro": ChimeraConfig(vocab_size=4096, d_model=128, n_layers=6, n_heads=2, n_kv_heads=1,
                           sliding_window=128, max_seq_len=512),
    "tiny": ChimeraConfig(vocab_size=4096, d_model=256, n_layers=6, n_heads=4, n_kv_heads=2,
                          sliding_window=128, max_seq_len=512),
    # the reference presets of the spec
    "small": ChimeraConfig(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4),
    "medium": ChimeraConfig(d_model=1024, n_layers=16, n_heads=16, n_kv_heads=4),  # Wyrd
    "base": ChimeraConfig(d_model=2048, n_layers=24, n_heads=16, n_kv_heads=4),
    "large": ChimeraConfig(d_model=2560, n_layers=32, n_heads=20, n_kv_heads=4),
}


def get_config(name):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------------
# Parameters, and the two layers every block uses: Linear and RMSNorm


class Module:
    """Holds Tensors and sub-modules; names them as the spec does (`layers.3.ffn.w1.weight`)."""

    def named_parameters(self, prefix=""):
        out = []
        for name, v in vars(self).items():
            if isinstance(v, Tensor):
                out.append((prefix + name, v))
            elif isinstance(v, Module):
                out += v.named_parameters(f"{prefix}{name}.")
            elif isinstance(v, list):
                for i, m in enumerate(v):
                    out += m.named_parameters(f"{prefix}{name}.{i}.")
        return out

    def parameters(self):
        return [p for _, p in self.named_parameters()]


def _normal(rng, shape, dtype):
    if rng is None:  # Chimera(init=None): left for load to fill (untouched pages cost no memory)
        return Tensor(np.empty(shape, dtype), requires_grad=True)
    return Tensor(rng.standard_normal(shape, dtype=np.float32).astype(dtype) * dtype(0.02), requires_grad=True)


class Linear(Module):
    def __init__(self, d_in, d_out, rng, dtype, bias=False):
        self.weight = _normal(rng, (d_out, d_in), dtype)  # [out, in], as PyTorch stores it
        if bias:
            self.bias = Tensor(np.zeros(d_out, dtype), requires_grad=True)

    def __call__(self, x):
        return linear(x, self.weight, getattr(self, "bias", None))


def share_rows(rng, *linears):
    """Let Linears that read the same input keep their weights as consecutive rows of one
    buffer, so `project` multiplies by all of them at once without copying them together.
    Each weight stays a Tensor of its own under its own name and shape (checkpoints, the
    optimizer and load see no difference); load and AdamW write into them in place.
    rng None: the weights are unset, and the buffer's pages stay untouched until load."""
    buf = np.empty((sum(m.weight.shape[0] for m in linears), linears[0].weight.shape[1]), linears[0].weight.dtype)
    at = 0
    for m in linears:
        if rng is not None:
            buf[at:at + m.weight.shape[0]] = m.weight.data
        m.weight.data = buf[at:at + m.weight.shape[0]]
        at += m.weight.shape[0]


def project(x, *linears):
    """[m(x) for m in linears] side by side, [..., sum of outs], as one matrix product."""
    if isinstance(linears[0], Linear):
        return linear_stack(x, [m.weight for m in linears], [getattr(m, "bias", None) for m in linears])
    return cat([m(x) for m in linears])  # int8: quant.Int8Group computes them in one product


class RMSNorm(Module):
    def __init__(self, d, eps, dtype):
        self.weight = Tensor(np.ones(d, dtype), requires_grad=True)
        self.eps = eps

    def __call__(self, x):
        return rmsnorm(x, self.weight, self.eps)


# ---------------------------------------------------------------------------
# Token embedding (tied to the output head)


class Embedding(Module):
    def __init__(self, n, d, rng, dtype):
        self.weight = _normal(rng, (n, d), dtype)

    def __call__(self, ids):
        return embedding(self.weight, ids)

    def head(self, x):
        """Logits x E^T: the output head when it is tied to the embedding."""
        return linear(x, self.weight)


# ---------------------------------------------------------------------------
# RoPE: rotary position embedding of queries and keys (attention layers).
# Each Numba kernel here has a plain NumPy twin in tests/test_kernels.py.


@njit(parallel=True, cache=True, fastmath=FAST)
def rope_kernel(x, cos, sin, out):
    """Rotate-half RoPE: for j < D/2, the pair (x_j, x_{j+D/2}) turns by angle_j.

    x, out [B, T, Hx, D]; cos, sin [T, D/2] (the two halves share an angle).
    A rotation's inverse is its transpose, the rotation by -angle, so the
    backward is this same kernel called with -sin.
    """
    B, T, Hx, D = x.shape
    half = D // 2
    for bt in prange(B * T):
        b, t = bt // T, bt % T
        for h in range(Hx):
            for j in range(half):
                x1, x2 = x[b, t, h, j], x[b, t, h, j + half]
                out[b, t, h, j] = x1 * cos[t, j] - x2 * sin[t, j]
                out[b, t, h, j + half] = x2 * cos[t, j] + x1 * sin[t, j]


def rope_angles(positions, head_dim, theta, dtype):
    """cos, sin [T, D/2] for absolute positions; angles in float64 because
    positions grow without bound during generation."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # theta^(-2j/D)
    angle = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angle).astype(dtype), np.sin(angle).astype(dtype)


def rope(x, cos, sin):
    """RoPE(x) = x cos + rotate_half(x) sin, x [B, T, Hx, D]."""
    xd = np.ascontiguousarray(x.data)
    y = np.empty_like(xd)
    rope_kernel(xd, cos, sin, y)

    def backward(g):  # the inverse rotation
        gx = np.empty(g.shape, g.dtype)
        rope_kernel(np.ascontiguousarray(g), cos, -sin, gx)
        x._acc(gx)
    return Tensor.make(y, (x,), backward)


# ---------------------------------------------------------------------------
# RG-LRU, the recurrent layer: the decay a_t, the gated input u_t and the linear
# scan h_t = a_t h_{t-1} + u_t in one kernel each way, the op, then the layer.


SCAN_BLOCK = 256  # channels per task: 1 KB contiguous per time step, so it streams and vectorises


def rglru_log_a(lambda_param):
    """log a = log(sigmoid(lambda) + 1e-8) (the 1e-8 keeps a -> 0 finite) and d log a / d lambda,
    in float64: sigmoid(lambda) can lie within 1e-4 of 1."""
    s = 1.0 / (1.0 + np.exp(-np.asarray(lambda_param, np.float64)))
    return np.log(s + 1e-8), s * (1.0 - s) / (s + 1e-8)


@njit(parallel=True, cache=True, fastmath=FAST)
def rglru_forward_kernel(y, c_log_a, h0, a, i, r, h):
    """The RG-LRU from its stacked projections y = [xp | z_i | z_r] [B, T, 3d] to h [B, T, d]:
    r = sigmoid(z_r), a_t = exp(c log a r), i = sigmoid(z_i),
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2 + 1e-6) i xp_t. Keeps a_t, i and r for the backward.
    Tasks are (batch row, block of channels), each walking time in order; the loop over
    channels reads rows of one time step, so it vectorises."""
    B, T, d = h.shape
    one, eps = h.dtype.type(1.0), h.dtype.type(1e-6)  # float32 stays float32 (and SIMD)
    nblk = (d + SCAN_BLOCK - 1) // SCAN_BLOCK
    for job in prange(B * nblk):
        b = job // nblk
        lo = (job % nblk) * SCAN_BLOCK
        hi = min(lo + SCAN_BLOCK, d)
        prev = h0[b, lo:hi].copy()
        for t in range(T):
            yt, at_, it_, rt_, ht = y[b, t], a[b, t], i[b, t], r[b, t], h[b, t]
            for c in range(lo, hi):
                rt = sigmoid_scalar(yt[2 * d + c])
                it = sigmoid_scalar(yt[d + c])
                at = exp(c_log_a[c] * rt)
                hc = at * prev[c - lo] + math.sqrt(one - at * at + eps) * it * yt[c]
                prev[c - lo] = hc
                ht[c] = hc
                at_[c] = at
                it_[c] = it
                rt_[c] = rt


@njit(parallel=True, cache=True, fastmath=FAST)
def rglru_backward_kernel(y, c_log_a, h0, a, i, r, h, gh, gy, gh0, gc_log_a):
    """Backward of the kernel above, in reverse time. With g_t = dL/dh_t (gh_t plus
    g_{t+1} a_{t+1}, h_t feeding h_{t+1}) and m = sqrt(1 - a^2 + 1e-6):
      dL/da_t = g_t h_{t-1} - g_t a_t i xp / m;   dL/dxp = g_t m i;
      dL/dz_i = g_t m xp i (1 - i);   dL/dz_r = dL/da_t a_t c log a r (1 - r);
      dL/d(c log a) += dL/da_t a_t r;   dL/dh0 = g_0 a_0.
    gc_log_a [B, d] has a row per batch row (its tasks own those channels: no races)."""
    B, T, d = h.shape
    one, eps = h.dtype.type(1.0), h.dtype.type(1e-6)
    nblk = (d + SCAN_BLOCK - 1) // SCAN_BLOCK
    for job in prange(B * nblk):
        b = job // nblk
        lo = (job % nblk) * SCAN_BLOCK
        hi = min(lo + SCAN_BLOCK, d)
        carry = np.zeros(hi - lo, h.dtype)   # g_{t+1} a_{t+1}: what h_t receives through h_{t+1}
        gc = np.zeros(hi - lo, h.dtype)
        for t in range(T - 1, -1, -1):
            yt, gyt, ght, at_, it_, rt_ = y[b, t], gy[b, t], gh[b, t], a[b, t], i[b, t], r[b, t]
            prev = h0[b] if t == 0 else h[b, t - 1]
            for c in range(lo, hi):
                g = ght[c] + carry[c - lo]
                at, it, rt, xp = at_[c], it_[c], rt_[c], yt[c]
                m = math.sqrt(one - at * at + eps)
                ga = g * prev[c] - g * at * it * xp / m
                gyt[c] = g * m * it
                gyt[d + c] = g * m * xp * it * (one - it)
                gyt[2 * d + c] = ga * at * c_log_a[c] * rt * (one - rt)
                gc[c - lo] += ga * at * rt
                carry[c - lo] = g * at
        gh0[b, lo:hi] = carry
        gc_log_a[b, lo:hi] = gc


def rglru(y, lambda_param, h0, c):
    """h [B, T, d] from y = [xp | z_i | z_r] [B, T, 3d]: rglru_reference.py's three ops
    in one kernel each way, as one pass over time needs no [B, T, d]
    temporaries between them (tests/test_kernels.py checks it against those three)."""
    yd = np.ascontiguousarray(y.data)
    B, T, d3 = yd.shape
    d = d3 // 3
    log_a, dlog_a = rglru_log_a(lambda_param.data)
    c_log_a = (c * log_a).astype(yd.dtype)
    h0d = np.ascontiguousarray(np.broadcast_to(h0.data.reshape(-1, d), (B, d)))
    a, i, r, h = (np.empty((B, T, d), yd.dtype) for _ in range(4))
    rglru_forward_kernel(yd, c_log_a, h0d, a, i, r, h)

    def backward(g):
        gy, gh0, gc = np.empty_like(yd), np.empty_like(h0d), np.empty((B, d), yd.dtype)
        rglru_backward_kernel(yd, c_log_a, h0d, a, i, r, h, np.ascontiguousarray(g), gy, gh0, gc)
        y._acc(gy)
        lambda_param._acc((gc.sum(axis=0) * c * dlog_a).astype(yd.dtype))
        h0._acc(gh0.sum(axis=0).reshape(h0.shape) if h0.data.size == d else gh0.reshape(h0.shape))
    return Tensor.make(h, (y, lambda_param, h0), backward)


class RGLRU(Module):
    """The Real-Gated Linear Recurrent Unit (Griffin), width d."""

    def __init__(self, cfg, rng, dtype):
        d = cfg.d_model
        self.c = cfg.c
        self.input_proj = Linear(d, d, rng, dtype)
        self.input_gate_proj = Linear(d, d, rng, dtype, bias=True)
        self.recurrence_gate_proj = Linear(d, d, rng, dtype, bias=True)
        share_rows(rng, self.input_proj, self.input_gate_proj, self.recurrence_gate_proj)
        # sigmoid(U(4, 9)) in [0.982, 0.9999]: slow decay, long memory at init
        self.lambda_param = Tensor(np.empty(d, dtype) if rng is None else rng.uniform(4.0, 9.0, d).astype(dtype),
                                   requires_grad=True)
        self.h0 = Tensor(np.zeros((1, 1, d), dtype), requires_grad=True)
        self.norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.output_proj = Linear(d, d, rng, dtype)

    def __call__(self, x, pos0=0, cache=None):
        # y = [xp | z_i | z_r]: input_proj(x), input_gate_proj(x), recurrence_gate_proj(x)
        y = project(x, self.input_proj, self.input_gate_proj, self.recurrence_gate_proj)   # [B, T, 3d]
        h0 = self.h0 if cache is None else Tensor(cache["h"])
        # a_t = a^(c r_t), r_t = sigmoid(z_r): r_t -> 0 keeps the state (a_t -> 1), r_t -> 1
        # decays it at the learned rate a; u_t = sqrt(1 - a_t^2) (sigmoid(z_i) xp_t): a state
        # that forgets a fraction lets in just enough input to stay at unit scale (1e-6 keeps
        # the sqrt's slope finite); h_t = a_t h_{t-1} + u_t
        h = rglru(y, self.lambda_param, h0, self.c)                                      # [B, T, d]
        if cache is not None:
            cache["h"] = h.data[:, -1].copy()
        return self.output_proj(self.norm(h))


# ---------------------------------------------------------------------------
# Sliding-window grouped-query attention: the kernels, the op, the layer


@njit(parallel=True, cache=True, fastmath=FAST)
def attention_forward_kernel(q, kt, v, window, scale, out, lse):
    """Sliding-window causal GQA attention, O(Tq * W) work and O(W) scratch.

    q [B, Tq, H, D]; kt [B, KV, D, Tk] (the keys transposed, so a query's scores
    against its window are one vector loop per channel, summed in channel order);
    v [B, KV, Tk, D] (each value a contiguous row) with Tk >= Tq: the queries are the
    last Tq positions of the keys (Tk > Tq when decoding with a cache of past keys).
    Query t (key index i = t + Tk - Tq) sees keys i - W < s <= i; query head h reads
    kv head h // (H / KV). Writes out [B, Tq, H, D] and the row log-sum-exp lse
    [B, H, Tq]: all the backward needs to rebuild the probabilities, so no [T, T] or
    [T, W] matrix is ever kept.
    """
    B, Tq, H, D = q.shape
    KV, Tk = kt.shape[1], kt.shape[3]
    group = H // KV
    offset = Tk - Tq
    one = q.dtype.type(1.0)  # sums stay in q's precision (float32 stays SIMD)
    for job in prange(B * KV):
        b, kh = job // KV, job % KV
        p = np.empty(window, dtype=q.dtype)
        acc, lanes = np.empty(D, dtype=q.dtype), np.empty(LANES, dtype=q.dtype)
        for h in range(kh * group, (kh + 1) * group):
            for t in range(Tq):
                i = t + offset
                s0 = max(0, i - window + 1)
                n = i - s0 + 1
                scores(q[b, t, h], kt[b, kh], s0, n, p)   # p_j = q_t . k_{s0+j}
                m = p[0]
                for j in range(1, n):
                    m = max(m, p[j])
                m *= scale
                for j in range(n):
                    p[j] = exp(p[j] * scale - m)
                total = lane_sum(p[:n], lanes)
                inv = one / total
                for j in range(n):   # normalise in place: stores keep p in q's dtype, so the
                    p[j] *= inv      # loop below stays float32 for float32 inputs (and vectorises)
                acc[:] = 0.0
                for j in range(n):                      # o_t = sum_j p_j v_{s0+j}
                    for e in range(D):
                        acc[e] += p[j] * v[b, kh, s0 + j, e]
                out[b, t, h, :] = acc
                lse[b, h, t] = m + math.log(total)


@njit(inline="always")
def scores(q, kt, s0, n, p):
    """p[j] = q . kt[:, s0 + j] for j < n, accumulated channel by channel: each step a
    vector loop over the keys, so no sum needs reordering to vectorise."""
    p[:n] = 0.0
    for e in range(q.size):
        for j in range(n):
            p[j] += q[e] * kt[e, s0 + j]


@njit(parallel=True, cache=True, fastmath=FAST)
def attention_backward_kernel(q, k, kt, vt, out, lse, gout, window, scale, dq, dk, dv):
    """Backward of the kernel above, rebuilding p_ts = exp(score_ts - lse_t).

    With o_t = sum_s p_ts v_s and p = softmax(score):
      dv_s += p_ts go_t;  dp_ts = go_t . v_s;  dscore_ts = p_ts (dp_ts - go_t . o_t)
      dq_t += scale dscore_ts k_s;  dk_s += scale dscore_ts q_t
    k [B, KV, Tk, D] and its transpose kt, vt [B, KV, D, Tk]. A task owns one kv head
    of one batch row, and with it every query head that reads it, so no two tasks
    write the same dk/dv entries. dk, dv [B, KV, Tk, D] must start at 0.
    """
    B, Tq, H, D = q.shape
    KV, Tk = k.shape[1], k.shape[2]
    group = H // KV
    offset = Tk - Tq
    for job in prange(B * KV):
        b, kh = job // KV, job % KV
        p = np.empty(window, dtype=q.dtype)
        ds = np.empty(window, dtype=q.dtype)
        acc, lanes = np.empty(D, dtype=q.dtype), np.empty(LANES, dtype=q.dtype)
        for h in range(kh * group, (kh + 1) * group):
            for t in range(Tq):
                i = t + offset
                s0 = max(0, i - window + 1)
                n = i - s0 + 1
                delta = dot(gout[b, t, h], out[b, t, h], lanes)
                scores(q[b, t, h], kt[b, kh], s0, n, p)      # the scores, as the forward
                scores(gout[b, t, h], vt[b, kh], s0, n, ds)  # go_t . v_s
                for j in range(n):
                    p[j] = exp(p[j] * scale - lse[b, h, t])
                    ds[j] = p[j] * (ds[j] - delta) * scale  # dscore, scaled for q and k
                acc[:] = 0.0
                for j in range(n):
                    s = s0 + j
                    for e in range(D):
                        acc[e] += ds[j] * k[b, kh, s, e]
                        dk[b, kh, s, e] += ds[j] * q[b, t, h, e]
                        dv[b, kh, s, e] += p[j] * gout[b, t, h, e]
                dq[b, t, h, :] = acc


def window_attention(q, k, v, window):
    """softmax(q k^T / sqrt(D)) v over the sliding causal window, with GQA.
    q [B, Tq, H, D]; k, v [B, Tk, KV, D], as the projections produce them."""
    qd = np.ascontiguousarray(q.data)
    kt = np.ascontiguousarray(k.data.transpose(0, 2, 3, 1))   # [B, KV, D, Tk]
    vd = np.ascontiguousarray(v.data.transpose(0, 2, 1, 3))   # [B, KV, Tk, D]
    B, Tq, H, D = qd.shape
    scale = qd.dtype.type(1.0 / math.sqrt(D))
    out = np.empty_like(qd)
    lse = np.empty((B, H, Tq), dtype=qd.dtype)
    attention_forward_kernel(qd, kt, vd, window, scale, out, lse)

    def backward(g):
        kd = np.ascontiguousarray(k.data.transpose(0, 2, 1, 3))
        vt = np.ascontiguousarray(v.data.transpose(0, 2, 3, 1))
        dq, dk, dv = np.empty_like(qd), np.zeros_like(kd), np.zeros_like(vd)
        attention_backward_kernel(qd, kd, kt, vt, out, lse, np.ascontiguousarray(g), window, scale, dq, dk, dv)
        q._acc(dq)
        k._acc(dk.transpose(0, 2, 1, 3))
        v._acc(dv.transpose(0, 2, 1, 3))
    return Tensor.make(out, (q, k, v), backward)


class LocalAttention(Module):
    """Sliding-window grouped-query attention with RoPE; no biases."""

    def __init__(self, cfg, rng, dtype):
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window, self.theta = cfg.sliding_window, cfg.rope_theta
        d, H, KV, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(d, H * D, rng, dtype)
        self.k_proj = Linear(d, KV * D, rng, dtype)
        self.v_proj = Linear(d, KV * D, rng, dtype)
        self.o_proj = Linear(H * D, d, rng, dtype)
        share_rows(rng, self.q_proj, self.k_proj, self.v_proj)

    def __call__(self, x, pos0=0, cache=None):
        B, T, _ = x.shape
        H, KV, D, W = self.n_heads, self.n_kv_heads, self.head_dim, self.window
        cos, sin = rope_angles(np.arange(pos0, pos0 + T), D, self.theta, x.dtype)
        q, k, v = split(project(x, self.q_proj, self.k_proj, self.v_proj), [H * D, KV * D, KV * D])
        q = rope(q.reshape(B, T, H, D), cos, sin)                    # [B, T, H, D]
        k = rope(k.reshape(B, T, KV, D), cos, sin)                   # [B, T, KV, D]
        v = v.reshape(B, T, KV, D)
        if cache is not None:
            k, v = self._use_ring(cache, pos0, k.data, v.data)
        o = window_attention(q, k, v, W)                             # [B, T, H, D]
        return self.o_proj(o.reshape(B, T, H * D))

    def _use_ring(self, cache, pos0, k, v):
        """Decoding: the keys/values the new queries attend to, and the ring [B, KV, W, D]
        updated with the newest ones (position p in slot p % W: the same memory at any
        position). The cached past is prepended to the new keys, except for one token
        after a full ring: stored first, it reads the ring as it lies, since each key
        carries its position in its RoPE rotation and attention ignores their order
        (without a graph only: a backward would see the ring after later steps)."""
        W, T = self.window, k.shape[1]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)          # [B, KV, T, D], as the ring holds them
        if T == 1 and pos0 >= W - 1 and not is_grad_enabled():
            cache["k"][:, :, pos0 % W] = k[:, :, 0]
            cache["v"][:, :, pos0 % W] = v[:, :, 0]
            return Tensor(cache["k"].transpose(0, 2, 1, 3)), Tensor(cache["v"].transpose(0, 2, 1, 3))
        past = min(pos0, W - 1)  # a query sees itself and W - 1 earlier keys
        positions = pos0 - past + np.arange(past)                        # their slots: positions % W
        k_all = np.concatenate([np.take(cache["k"], positions, axis=2, mode="wrap"), k], axis=2)
        v_all = np.concatenate([np.take(cache["v"], positions, axis=2, mode="wrap"), v], axis=2)
        keep = min(T, W)
        new_slots = (pos0 + T - keep + np.arange(keep)) % W
        cache["k"][:, :, new_slots] = k[:, :, T - keep:]
        cache["v"][:, :, new_slots] = v[:, :, T - keep:]
        # [B, Tk, KV, D] views of kv-major arrays: window_attention transposes them back for free
        return Tensor(k_all.transpose(0, 2, 1, 3)), Tensor(v_all.transpose(0, 2, 1, 3))


# ---------------------------------------------------------------------------
# SwiGLU feed-forward, and the residual block


class FFN(Module):
    """SwiGLU: w2(silu(w1 x) * (w3 x))."""

    def __init__(self, cfg, rng, dtype):
        self.w1 = Linear(cfg.d_model, cfg.ffn_hidden, rng, dtype)
        self.w3 = Linear(cfg.d_model, cfg.ffn_hidden, rng, dtype)
        self.w2 = Linear(cfg.ffn_hidden, cfg.d_model, rng, dtype)
        share_rows(rng, self.w1, self.w3)

    def __call__(self, x):
        return self.w2(swiglu(project(x, self.w1, self.w3)))


class Block(Module):
    """Pre-norm residual block: x + mix(norm1(x)), then x + ffn(norm2(x))."""

    def __init__(self, cfg, i, rng, dtype):
        self.norm1 = RMSNorm(cfg.d_model, cfg.rms_norm_eps, dtype)
        self.temporal_mix = (LocalAttention if cfg.is_attention(i) else RGLRU)(cfg, rng, dtype)
        self.norm2 = RMSNorm(cfg.d_model, cfg.rms_norm_eps, dtype)
        self.ffn = FFN(cfg, rng, dtype)

    def __call__(self, x, pos0=0, cache=None):
        x = x + self.temporal_mix(self.norm1(x), pos0, cache)
        return x + self.ffn(self.norm2(x))


# ---------------------------------------------------------------------------
# The model


class Chimera(Module):
    """init="wyrd" (the default) trains much faster on a CPU budget than the spec's
    init="reference" (docs/04 measures both); the forward pass is the same.
    init=None leaves the weights unset, for `load` to fill."""

    def __init__(self, config, seed=0, dtype=np.float32, init="wyrd"):
        if isinstance(config, str):
            config = get_config(config)
        if init not in ("wyrd", "reference", None):
            raise ValueError(f"init must be 'wyrd', 'reference' or None, got {init!r}")
        self.config, self.dtype = config, np.dtype(dtype)
        self.int8 = None  # quant.Int8Decoder once quant.py has made the matrices int8
        rng = None if init is None else np.random.default_rng(seed)
        dt = self.dtype.type
        self.embed_tokens = Embedding(config.vocab_size, config.d_model, rng, dt)
        self.layers = [Block(config, i, rng, dt) for i in range(config.n_layers)]
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps, dt)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.d_model, config.vocab_size, rng, dt)
        if init == "wyrd":
            self._wyrd_init(rng)

    def _wyrd_init(self, rng):
        """Three changes to the spec's init (N(0, 0.02), lambda ~ U(4, 9)), each measured in
        docs/04 and explained in docs/architecture.md §3.5:
        - each residual branch's last projection (output_proj, o_proj, w2) starts at zero,
          so each block starts as the identity and no branch drowns the token embedding;
        - a = sigmoid(lambda) in [0.9, 0.999], uniform in a^2 (Griffin's range), so some
          channels remember a few tokens and others hundreds;
        - the embedding has std 0.05 sqrt(128 / d), rows of the same norm at every width,
          large enough that the opening branches do not drown the current token."""
        self.embed_tokens.weight.data *= 0.05 * np.sqrt(128 / self.config.d_model) / 0.02
        for layer in self.layers:
            mix = layer.temporal_mix
            for proj in (mix.o_proj if isinstance(mix, LocalAttention) else mix.output_proj, layer.ffn.w2):
                proj.weight.data[...] = 0
            if isinstance(mix, RGLRU):
                a = np.sqrt(rng.uniform(0.9 ** 2, 0.999 ** 2, mix.lambda_param.shape))
                mix.lambda_param.data[...] = np.log(a / (1 - a))  # the logit: sigmoid(lambda) = a

    def _head(self, x):
        return self.embed_tokens.head(x) if self.config.tie_word_embeddings else self.lm_head(x)

    def _check_ids(self, ids):
        ids = np.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be an integer array [batch, time], got {ids.dtype} {ids.shape}")
        if ids.size == 0:
            raise ValueError(f"token ids are empty: shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got [{ids.min()}, {ids.max()}]")
        return ids

    def hidden(self, ids, state=None):
        """The residual stream after the last block, [B, T, d] (before the final norm)."""
        ids = self._check_ids(ids)
        pos0 = 0 if state is None else state.pos
        x = self.embed_tokens(ids)                                   # [B, T, d]
        for i, layer in enumerate(self.layers):
            x = layer(x, pos0, None if state is None else state.layers[i])
        if state is not None:
            state.pos += ids.shape[1]
        return x

    def __call__(self, ids):
        """Logits [B, T, V] for every position."""
        return self._head(self.norm(self.hidden(ids)))

    def loss(self, ids, targets, mask=None):
        """Mean cross-entropy of targets [B, T] over positions where mask == 1."""
        logits = self(ids)
        targets = np.asarray(targets)
        if targets.shape != logits.shape[:2]:
            raise ValueError(f"targets shape {targets.shape} does not match ids shape {logits.shape[:2]}")
        if mask is not None and np.shape(mask) != targets.shape:
            raise ValueError(f"mask shape {np.shape(mask)} does not match targets shape {targets.shape}")
        return cross_entropy(logits.reshape(-1, self.config.vocab_size), targets, mask)

    # -- decoding -------------------------------------------------------------
    def init_state(self, batch_size=1):
        state = DecodeState(self.config, batch_size, self.dtype)
        for layer, s in zip(self.layers, state.layers):
            if "h" in s:  # a fresh sequence starts from the learned h0
                s["h"] = np.repeat(layer.temporal_mix.h0.data.reshape(1, -1), batch_size, axis=0)
        return state

    def step(self, ids, state):
        """Consume ids [B, n] (a prompt chunk or one token) and return the next-token
        logits [B, V] as a NumPy array, advancing `state` in place."""
        ids = np.asarray(ids)
        n = ids.size
        if ids.ndim and len(ids) != state.batch_size:  # (the int8 kernels would write past h)
            raise ValueError(f"token ids have {len(ids)} rows but the state holds {state.batch_size} sequences")
        if self.int8 is not None and self.int8.takes(ids):
            return self.int8.step(ids, state)                        # int8: a Numba call per block
        serial = self.int8.serial(n) if self.int8 is not None else n <= SERIAL_ROWS
        with no_grad(), serial_kernels(serial):
            x = self.hidden(ids, state)[:, -1:]                       # only the last position is needed
            return self._head(self.norm(x)).data[:, 0]

    @property
    def quantized(self):
        """The weights' format when quant.py made them int8 ("int8"), else None."""
        return None if self.int8 is None else "int8"

    # -- parameters -----------------------------------------------------------
    def num_params(self):
        int8 = self.int8.num_params() if self.int8 is not None else 0
        return sum(p.size for p in self.parameters()) + int8

    def state_dict(self):
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state):
        """Copy name -> array into the parameters; strict: nothing is copied unless every
        name and shape fits."""
        problem = shape_mismatch({n: p.shape for n, p in self.named_parameters()},
                                 {n: np.shape(a) for n, a in state.items()})
        if problem:
            raise ValueError("load_state_dict: " + problem)
        for n, p in self.named_parameters():
            p.data[...] = np.asarray(state[n], dtype=self.dtype)
        if self.int8 is not None:  # its c log a is derived from lambda_param
            self.int8.refresh()


# ---------------------------------------------------------------------------
# Decoding: O(1) state per sequence, kernels on one thread for short chunks


class DecodeState:
    """O(1) decoding state: per recurrent layer h [B, d]; per attention layer a
    ring buffer of the last W rotated keys and values [B, KV, W, D]; and `pos`,
    the number of tokens consumed (the absolute position of the next one)."""

    def __init__(self, cfg, batch_size, dtype):
        self.pos, self.batch_size = 0, batch_size
        self.layers = []
        for i in range(cfg.n_layers):
            if cfg.is_attention(i):
                shape = (batch_size, cfg.n_kv_heads, cfg.sliding_window, cfg.head_dim)
                self.layers.append({"k": np.zeros(shape, dtype), "v": np.zeros(shape, dtype)})
            else:
                self.layers.append({"h": None})

    def copy(self):
        return copy.deepcopy(self)

    def nbytes(self):
        return sum(a.nbytes for layer in self.layers for a in layer.values() if a is not None)


SERIAL_ROWS = 32  # up to this many tokens, one thread runs the Numba kernels (int8: quant.Int8Decoder.serial)


@contextlib.contextmanager
def serial_kernels(on=True):
    """Run Numba kernels on the calling thread alone: waking the other cores for a
    parallel loop costs more than a kernel over one token's row."""
    prev = numba.get_num_threads()
    if on:
        numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(prev)
