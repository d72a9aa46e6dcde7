# %% [markdown]
# # Speed
#
# How fast is NumPy + Numba, and where does the time go?
#
# 1. **The yardstick**: the float32 matmul rate of this machine (BLAS through
#    NumPy), and its matrix-vector bandwidth.
# 2. **Kernels**: the RG-LRU scan and the sliding-window attention, forward +
#    backward. Windowed attention costs O(T W), linear in the sequence length,
#    where dense attention costs O(T²).
# 3. **Training throughput** of whole models, and its *utilisation*: a training
#    step costs about 6 FLOPs per parameter per token (2 forward, 4 backward), so
#    `6 N tokens/s` over the matmul rate is the share of the machine's peak we use.
# 4. **Decoding**: the cost of one new token as the context grows. With O(1)
#    state (`model.step`) it is flat; recomputing the whole context for every
#    token (what a model without a cache would do) grows linearly.
#
# All timings are wall-clock medians or minima of a few repeats on whatever
# machine runs this, so they move with the load of the machine.

# %%
import report  # first: puts the repo root on sys.path

import os
import time
from dataclasses import replace

import numba
import numpy as np

import svg
import rglru_reference
import wyrd
import bench_kernels  # bench/: the benchmarks' own yardstick and timer
from bench_kernels import best_of
from autograd import Tensor, no_grad

args = report.parse_args("Speed: kernel and model throughput, utilisation, decode cost against context length.")
rep = report.Report(args, "05_speed")
quick = args.quick
rng = np.random.default_rng(0)


# %% [markdown]
# ## 1. The yardstick
#
# A square float32 GEMM does 2n³ FLOPs; a matrix-vector product reads the whole
# matrix once, so its rate is a memory bandwidth. Training is bound by the
# first, decoding one token at a time by the second.

# %%
n = 512 if quick else 2048
matmul_gflops = bench_kernels.matmul_gflops(n)
rows = 4096 if quick else 8192
m_mb = rows * 4096 * 4 / 1e6
matvec_gbps = bench_kernels.matvec_gbps(rows, 4096)
blas_threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
print(f"float32 matmul {matmul_gflops:.1f} GFLOP/s, matvec {matvec_gbps:.1f} GB/s on {os.cpu_count()} cores")
rep.md(f"""
| measurement | rate |
|---|---|
| float32 matmul, {n} x {n} (NumPy/BLAS) | **{matmul_gflops:.1f} GFLOP/s** |
| float32 matrix-vector, {m_mb:.0f} MB matrix (bandwidth of reading it) | **{matvec_gbps:.1f} GB/s** |
| threads: Numba (`NUMBA_NUM_THREADS`), BLAS (`OPENBLAS_NUM_THREADS`) | {numba.get_num_threads()}, {blas_threads} |

Every rate below is relative to this run's threads: on a machine shared with other
jobs, one thread each is often faster than waiting for a descheduled second one.
This matrix, like `tiny`'s 24 MB of weights (section 4), may fit in a large
last-level cache, and then this is the cache's rate rather than main memory's;
`bench/bench_model.py` bounds `medium` (0.9 GB of weights) with a 1 GB matrix instead.
""")
rep.record(matmul_gflops=matmul_gflops, matvec_gbps=matvec_gbps, cores=os.cpu_count(),
           numba_threads=numba.get_num_threads(), blas_threads=blas_threads)

# %% [markdown]
# ## 2. Kernels
#
# The scan touches each element a few times and does one multiply-add per
# element, so it is measured in GB/s. The attention kernel does
# `2 x 2 x H x T x min(T, W) x D` FLOPs forward (scores and the weighted sum of
# values) and about 2.5 times that backward; we time forward + backward with
# W = 128 as T grows, against a dense NumPy attention that builds the full
# [T, T] score matrix and masks it.


# %%
def scan_gbps(B, T, d):
    a = rng.uniform(0.5, 1.0, (B, T, d)).astype(np.float32)
    u, g = rng.standard_normal((2, B, T, d), dtype=np.float32)
    h0 = np.zeros((1, 1, d), np.float32)

    def run():
        ta, tu, th = Tensor(a, requires_grad=True), Tensor(u, requires_grad=True), Tensor(h0, requires_grad=True)
        rglru_reference.rglru_scan(ta, tu, th).backward(g)
    t = best_of(run)
    # forward reads a, u and writes h; backward reads a, h, g and writes du, da: ~8 arrays of B T d
    return t, 8 * a.nbytes / t / 1e9


def dense_attention(q, k, v, W):
    """Forward only, in NumPy: the [T, T] score matrix masked to the window."""
    B, T, H, D = q.shape
    rep_ = H // k.shape[2]
    qh = q.transpose(0, 2, 1, 3)                                   # [B, H, T, D]
    kh, vh = (np.repeat(x, rep_, 2).transpose(0, 2, 1, 3) for x in (k, v))  # each KV head serves H/KV heads
    s = qh @ kh.transpose(0, 1, 3, 2) / np.float32(np.sqrt(D))
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    s[..., (j > i) | (j <= i - W)] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ vh


def attention_times(T, B=1, H=4, KV=2, D=64, W=128):
    q = rng.standard_normal((B, T, H, D), dtype=np.float32)
    k, v = rng.standard_normal((2, B, T, KV, D), dtype=np.float32)
    g = rng.standard_normal((B, T, H, D), dtype=np.float32)

    def kernel():
        tq, tk, tv = (Tensor(x, requires_grad=True) for x in (q, k, v))
        wyrd.window_attention(tq, tk, tv, W).backward(g)

    def kernel_forward():
        wyrd.window_attention(Tensor(q), Tensor(k), Tensor(v), W)

    flops = 2 * 2 * B * H * sum(min(t + 1, W) for t in range(T)) * D
    t_fb, t_f = best_of(kernel, 3), best_of(kernel_forward, 3)
    t_dense = best_of(lambda: dense_attention(q, k, v, W), 3) if T <= 4096 else float("nan")
    return t_fb, t_f, t_dense, flops * 3.5 / t_fb / 1e9


scan_shape = (2, 64, 256) if quick else (8, 256, 1024)
scan_t, scan_rate = scan_gbps(*scan_shape)
print(f"scan B,T,d={scan_shape}: {scan_t * 1e3:.2f} ms fwd+bwd, {scan_rate:.1f} GB/s")
lengths = [64, 128, 256, 512] if quick else [128, 256, 512, 1024, 2048, 4096, 8192]
att = {T: attention_times(T) for T in lengths}
for T, (fb, f, dense, gf) in att.items():
    print(f"attention T={T}: fwd+bwd {fb * 1e3:.2f} ms ({gf:.1f} GFLOP/s), fwd {f * 1e3:.2f} ms, "
          f"dense numpy fwd {dense * 1e3:.2f} ms")

rep.md(f"""
**RG-LRU scan** (`rglru_reference.rglru_scan`, B, T, d = {scan_shape}), forward + backward:
{scan_t * 1e3:.2f} ms, **{scan_rate:.1f} GB/s** of the 8 arrays of B x T x d floats it reads and
writes (the scan does one multiply-add per element: it is bound by memory, not
arithmetic).

**Sliding-window attention** (`wyrd.window_attention`, 1 sequence, 4 query heads
over 2 KV heads of dimension 64, W = 128) against a dense NumPy attention that
builds the [T, T] score matrix and masks it (forward only):
""")
rep.table(["T", "window fwd (ms)", "window fwd+bwd (ms)", "fwd+bwd GFLOP/s", "dense NumPy fwd (ms)"],
          [[T, f * 1e3, fb * 1e3, gf, dense * 1e3] for T, (fb, f, dense, gf) in att.items()])
rep.figure("05_attention_time.svg", svg.line_plot(
    None, [{"label": "window kernel, fwd + bwd", "x": lengths, "y": [att[T][0] * 1e3 for T in lengths], "marker": True},
           {"label": "window kernel, fwd", "x": lengths, "y": [att[T][1] * 1e3 for T in lengths], "marker": True},
           {"label": "dense NumPy, fwd ([T, T] scores)", "x": lengths, "y": [att[T][2] * 1e3 for T in lengths],
            "marker": True, "dash": "6 4"}],
    title="Attention time against sequence length (W = 128)", xlabel="sequence length T (log scale)",
    ylabel="milliseconds (log scale)", logx=True, logy=True, legend="top left"), "attention time against length")
rep.record(scan_gbps=scan_rate,
           attention={str(T): {"fwd_bwd_ms": fb * 1e3, "fwd_ms": f * 1e3, "dense_fwd_ms": dense * 1e3, "gflops": gf}
                      for T, (fb, f, dense, gf) in att.items()})

# %% [markdown]
# ## 3. Training throughput and utilisation
#
# One training step (forward, loss, backward; no optimizer) on random tokens,
# median of a few steps. Utilisation counts 6 FLOPs per parameter per token,
# with the tied embedding counted once (it is used as the output matmul): the
# usual estimate, which leaves out attention's own score FLOPs (small at W = 128).
# Utilisation = 6 x parameters x tokens/s / the matmul rate above: bigger
# matrices keep BLAS busier, and the Numba kernels and elementwise ops (norms,
# gates, softmax) weigh less.


# %%
def train_rate(config, B, T, steps):
    model = wyrd.Chimera(config)
    ids = rng.integers(0, config.vocab_size, (B, T + 1))
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        times.append(time.perf_counter() - t)
        for p in model.parameters():
            p.grad = None
    tok_s = B * T / float(np.median(times[1:]))  # the first step loads/compiles kernels
    return model.num_params(), tok_s, 6 * model.num_params() * tok_s / (matmul_gflops * 1e9)


models = ([("nano", wyrd.get_config("nano"), 8, 64)] if quick else
          [("nano", wyrd.get_config("nano"), 16, 128), ("tiny", wyrd.get_config("tiny"), 8, 256),
           ("tiny x2 width", replace(wyrd.get_config("tiny"), d_model=512, n_heads=8, n_kv_heads=2), 4, 256)])
throughput = {}
for name, config, B, T in models:
    throughput[name] = (B, T) + train_rate(config, B, T, 3 if quick else 5)
    print(f"{name}: {throughput[name][2]:,} params, B={B} T={T}: {throughput[name][3]:,.0f} tok/s, "
          f"utilisation {throughput[name][4]:.1%}")

rep.table(["model", "parameters", "batch x length", "tokens/s", "utilisation of matmul rate"],
          [[name, p, f"{B} x {T}", tok_s, f"{util:.1%}"] for name, (B, T, p, tok_s, util) in throughput.items()])
rep.figure("05_utilisation.svg", svg.bar_chart(
    None, list(throughput), [{"label": "utilisation (%)", "values": [100 * t[4] for t in throughput.values()]}],
    title="Training utilisation of the measured matmul rate", ylabel="% of float32 matmul FLOP/s",
    value_fmt="{:.1f}%"), "training utilisation")
rep.record(training={k: {"params": p, "tokens_per_s": t, "utilisation": u}
                     for k, (_, _, p, t, u) in throughput.items()})

# %% [markdown]
# ## 4. Decoding cost against context length
#
# `model.step` consumes one token and updates the O(1) state: the recurrent `h`
# and the ring buffers of the last W keys and values. Its cost should not depend
# on how many tokens came before. For contrast we time what a model without
# state has to do for each new token: run the full forward pass over the whole
# context (`model(ids)` under `no_grad`).

# %%
dec_name = "nano" if quick else "tiny"
dec_model = wyrd.Chimera(wyrd.get_config(dec_name))
V = dec_model.config.vocab_size
contexts = [16, 64, 256, 1024] if quick else [16, 64, 256, 1024, 4096, 16384]
n_new = 16 if quick else 32
decode = {}
for ctx in contexts:
    state = dec_model.init_state(1)
    ids = rng.integers(0, V, (1, ctx))
    dec_model.step(ids, state)                       # prefill: the state after ctx tokens
    token = np.array([[1]])
    times = []
    for _ in range(n_new):
        t = time.perf_counter()
        token[0, 0] = int(np.argmax(dec_model.step(token, state)))
        times.append(time.perf_counter() - t)
    with no_grad():
        full = best_of(lambda: dec_model(ids), 1 if ctx >= 4096 else 3)
    decode[ctx] = (float(np.median(times)), full, state.nbytes())
    print(f"context {ctx:6d}: step {decode[ctx][0] * 1e3:7.2f} ms/token, full forward {full * 1e3:9.1f} ms, "
          f"state {state.nbytes():,} bytes")

weights_bytes = 4 * dec_model.num_params()
bound = matvec_gbps * 1e9 / weights_bytes
flat = max(d[0] for d in decode.values()) / min(d[0] for d in decode.values())
median_step = float(np.median([d[0] for d in decode.values()]))
rep.md(f"""
The `{dec_name}` preset ({dec_model.num_params():,} parameters, window {dec_model.config.sliding_window}): median
time of `model.step` for one new token after each context, the full forward pass over the context,
and the bytes of decoding state.
""")
rep.table(["context", "step (ms/token)", "tokens/s", "full forward over the context (ms)", "state bytes"],
          [[c, s * 1e3, 1 / s, f * 1e3, nb] for c, (s, f, nb) in decode.items()])
rep.md(f"""
Slowest / fastest step time over contexts {contexts[0]} .. {contexts[-1]:,}: **{flat:.2f}x**{
" (flat up to timing noise)" if flat < 1.5 else ""}, while the full forward grows with the context
({decode[contexts[-1]][1] / decode[contexts[0]][1]:.0f}x from the shortest to the longest). A decoding
step must read every weight once: {weights_bytes / 1e6:.1f} MB of float32 at {matvec_gbps:.1f} GB/s allows
at most {bound:,.0f} tokens/s, and `model.step` reaches {1 / median_step:,.0f} tokens/s, {1 / median_step / bound:.0%}
of that bound; the rest goes to Python and per-op overhead, which weighs more the
smaller the model.
""")
rep.figure("05_decode_cost.svg", svg.line_plot(
    None, [{"label": "model.step (O(1) state)", "x": contexts, "y": [decode[c][0] * 1e3 for c in contexts],
            "marker": True, "width": 3},
           {"label": "full forward over the context", "x": contexts, "y": [decode[c][1] * 1e3 for c in contexts],
            "marker": True, "dash": "6 4"}],
    title=f"Cost of one new token ({dec_name})", xlabel="context length (tokens, log scale)",
    ylabel="milliseconds (log scale)", logx=True, logy=True, legend="top left"), "decode cost against context")
rep.record(decode={str(c): {"step_ms": s * 1e3, "full_forward_ms": f * 1e3, "state_bytes": nb}
                   for c, (s, f, nb) in decode.items()}, decode_flatness=flat, decode_bandwidth_bound=bound)
rep.save()
