"""Model benchmark: training-step throughput and utilisation, and decode speed.

    python bench/bench_model.py                 # medium decode, tiny B=8 T=256, medium B=1 T=256
    python bench/bench_model.py --only tiny     # one part: tiny | medium | decode | load

utilisation = 6 x parameters x tokens/s / (float32 matmul FLOP/s measured in the same run)
decode bound = matrix-vector GB/s / bytes of weights read per token
load memory = peak resident size added by wyrd.load of a medium checkpoint / the file's size

Decoding is measured in a process of its own under chat.py's thread policy
(runtime.py), as the REPL runs it.
"""
import argparse
import os
import resource
import subprocess
import sys
import time

# The environment as given, before runtime.py fills in training's thread policy: the
# decode child gets chat.py's policy instead.
GIVEN_ENV = dict(os.environ)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import runtime  # noqa: E402
from bench_kernels import matmul_gflops, matvec_gbps  # noqa: E402
from wyrd import Chimera, get_config  # noqa: E402

import numpy as np  # noqa: E402


def train_step_rate(preset, B, T, steps, peak):
    model = Chimera(get_config(preset))
    n = model.num_params()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, (B, T + 1))
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        times.append(time.perf_counter() - t)
        for p in model.parameters():
            p.grad = None
    dt = float(np.median(times[1:]))  # the first step compiles/caches
    tok_s = B * T / dt
    util = 6 * n * tok_s / (peak * 1e9)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"train {preset:6s} ({n / 1e6:7.2f}M params) B={B} T={T}: {dt * 1e3:8.1f} ms/step  "
          f"{tok_s:8.0f} tok/s  utilisation {util * 100:5.1f}%  peak RSS {rss:.2f} GB")


def decode_rate(preset, contexts, new_tokens):
    model = Chimera(get_config(preset))
    n = model.num_params()
    rng = np.random.default_rng(0)
    model.step(rng.integers(0, model.config.vocab_size, (1, 2)), model.init_state(1))  # load the kernels
    gbps = [matvec_gbps()]
    results = []
    for ctx in contexts:
        state = model.init_state(1)
        prompt = rng.integers(0, model.config.vocab_size, (1, ctx))
        t = time.perf_counter()
        logits = model.step(prompt, state)
        ttft = time.perf_counter() - t
        tok = np.array([[int(logits.argmax())]])
        times = []
        for _ in range(new_tokens):
            t = time.perf_counter()
            tok[0, 0] = int(model.step(tok, state).argmax())
            times.append(time.perf_counter() - t)
        rate = 1 / float(np.median(times))  # the median token: robust to a stall of the shared host
        results.append((ctx, ttft, rate, state.nbytes()))
    # The bound takes the faster of two matvec measurements, before and after decoding,
    # so a busy moment of a shared host cannot lower the bound and flatter the ratio.
    gbps.append(matvec_gbps())
    bound = max(gbps) * 1e9 / (4 * n)  # every weight (incl. the tied head) is read once per token
    print(f"machine: {os.cpu_count()} cores, matvec {gbps[0]:.1f} GB/s before decoding, {gbps[1]:.1f} after")
    for ctx, ttft, rate, nbytes in results:
        print(f"decode {preset} context {ctx:5d}: prefill {ttft * 1e3:7.0f} ms, {rate:6.2f} tok/s "
              f"({rate / bound * 100:5.1f}% of the {bound:.2f} tok/s bandwidth bound), state {nbytes / 1e6:.1f} MB")


def load_memory(path):
    """Peak resident bytes added by loading a checkpoint, in this (fresh) process."""
    import wyrd
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    wyrd.load(path)
    took = time.perf_counter() - t
    added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    size = os.path.getsize(path)
    print(f"load medium: {size / 1e9:.2f} GB file in {took:.1f} s, peak RSS added {added / 1e9:.2f} GB "
          f"= {added / size:.2f}x the file")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["tiny", "medium", "decode", "load"], default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--decode-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--load-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_child:
        load_memory(args.load_child)
        sys.exit()
    if args.only in (None, "load"):  # a medium checkpoint, loaded by a process of its own
        import tempfile
        import wyrd
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "medium.safetensors")
            wyrd.save(path, Chimera(get_config("medium")))
            subprocess.run([sys.executable, __file__, "--load-child", path], check=True)
    if args.only == "load":
        sys.exit()
    if args.decode_child:
        decode_rate("medium", [64, 4096], 64)
        sys.exit()
    if args.only in (None, "decode"):  # first, while this process is still small
        subprocess.run([sys.executable, __file__, "--decode-child"], check=True,
                       env={"OPENBLAS_THREAD_TIMEOUT": runtime.DECODE_BLAS_TIMEOUT, **GIVEN_ENV})
    if args.only == "decode":
        sys.exit()
    peak = matmul_gflops()
    print(f"machine: {os.cpu_count()} cores, float32 matmul {peak:.0f} GFLOP/s")
    if args.only in (None, "tiny"):
        train_step_rate("tiny", 8, 256, args.steps, peak)
    if args.only in (None, "medium"):
        train_step_rate("medium", 1, 256, args.steps, peak)
