"""Kernel benchmark: the RG-LRU scan and windowed attention against plain NumPy,
and the machine's float32 matmul rate (the yardstick for utilisation).

    python bench/bench_kernels.py
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from autograd import Tensor  # noqa: E402
from rglru_reference import rglru_scan  # noqa: E402
from wyrd import window_attention  # noqa: E402

import numpy as np  # noqa: E402


def best_of(fn, repeat=5):
    fn()  # warm-up (and Numba compilation)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_gflops(n=2048):
    """float32 GEMM rate on this machine, all cores, as NumPy/BLAS delivers it."""
    a, b = np.random.randn(n, n).astype(np.float32), np.random.randn(n, n).astype(np.float32)
    return 2 * n ** 3 / best_of(lambda: a @ b) / 1e9


def matvec_gbps(rows=32768, cols=8192):
    """float32 matrix-vector rate in GB/s of matrix read: the decode bound. The
    1 GB matrix is larger than this machine's 260 MB L3 cache, as a model's
    weights are, so the rate is main memory's and not the cache's."""
    a, x = np.random.randn(rows, cols).astype(np.float32), np.random.randn(cols).astype(np.float32)
    return a.nbytes / best_of(lambda: a @ x, repeat=10) / 1e9


def bench_scan(B=8, T=256, d=1024):
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 1, (B, T, d)).astype(np.float32)
    u, gh = rng.standard_normal((2, B, T, d)).astype(np.float32)
    h0 = np.zeros((B, d), np.float32)

    def kernel():
        ta, tu, th = Tensor(a, requires_grad=True), Tensor(u, requires_grad=True), Tensor(h0, requires_grad=True)
        rglru_scan(ta, tu, th).backward(gh)

    def numpy_loop():  # the same maths, one vectorised step per time step
        h = np.empty_like(a)
        prev = h0
        for t in range(T):
            prev = a[:, t] * prev + u[:, t]
            h[:, t] = prev
        du, da, g = np.empty_like(a), np.empty_like(a), np.zeros_like(h0)
        for t in reversed(range(T)):
            g = gh[:, t] + (a[:, t + 1] * g if t + 1 < T else 0)
            du[:, t] = g
            da[:, t] = g * (h[:, t - 1] if t > 0 else h0)
        return h, du, da

    tk, tn = best_of(kernel), best_of(numpy_loop)
    # bytes touched: forward reads a, u, writes h; backward reads a, h, gh, writes du, da
    gbytes = 8 * a.nbytes / 1e9
    print(f"scan B={B} T={T} d={d}  fwd+bwd: numba {tk * 1e3:7.2f} ms ({gbytes / tk:5.1f} GB/s)   "
          f"numpy loop {tn * 1e3:7.2f} ms   speed-up {tn / tk:5.1f}x")


def dense_attention(q, k, v, W, g):
    """Dense masked attention forward + backward in NumPy: [T, T] score matrices."""
    B, T, H, D = q.shape
    KV = k.shape[2]
    q, kr, vr, g = (x.transpose(0, 2, 1, 3) for x in (q, np.repeat(k, H // KV, 2), np.repeat(v, H // KV, 2), g))
    s = (q @ kr.transpose(0, 1, 3, 2)) / np.float32(np.sqrt(D))
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    s[..., (j > i) | (j <= i - W)] = -np.inf
    s -= s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    out = p @ vr
    dv = p.transpose(0, 1, 3, 2) @ g
    dp = g @ vr.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.float32(np.sqrt(D))
    return out, ds @ kr, ds.transpose(0, 1, 3, 2) @ q, dv


def bench_attention(T, B=8, H=16, KV=4, D=64, W=128):
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((2, B, T, H, D)).astype(np.float32)
    k, v = rng.standard_normal((2, B, T, KV, D)).astype(np.float32)

    def kernel():
        tq, tk, tv = (Tensor(x, requires_grad=True) for x in (q, k, v))
        window_attention(tq, tk, tv, W).backward(g)

    tk_, tn = best_of(kernel, 3), best_of(lambda: dense_attention(q, k, v, W, g), 3)
    dense_mb = B * H * T * T * 4 / 1e6
    flops = 2 * 2 * B * H * T * min(T, W) * D * 3.5  # fwd QK and PV (x2) + bwd (x2.5), window-limited
    print(f"attention T={T:5d} W={W}  fwd+bwd: numba {tk_ * 1e3:8.2f} ms ({flops / tk_ / 1e9:5.1f} GFLOP/s)   "
          f"dense numpy {tn * 1e3:8.2f} ms (one [T,T] matrix: {dense_mb:6.0f} MB)   speed-up {tn / tk_:5.2f}x")


if __name__ == "__main__":
    print(f"machine: {os.cpu_count()} cores;  float32 matmul {matmul_gflops():.0f} GFLOP/s;  "
          f"matvec {matvec_gbps():.1f} GB/s")
    bench_scan()
    bench_attention(128)
    bench_attention(1024)
