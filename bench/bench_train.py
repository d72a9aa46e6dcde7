"""Training-step benchmark: Wyrd against the PyTorch Chimera of check_pytorch.py.

    pip install torch safetensors && python bench/bench_train.py   # micro and tiny, B=8, T=256

A step is what train.py does: forward, backward, clip the global gradient norm to 1,
AdamW. The PyTorch contenders are written as a PyTorch user would write them: the
RG-LRU scan in parallel (Hillis-Steele doubling, check_pytorch.parallel_scan),
attention through F.scaled_dot_product_attention with a sliding-window mask,
F.cross_entropy, torch.nn.utils.clip_grad_norm_ and torch.optim.AdamW (foreach);
once eager and once under torch.compile (the model's forward and backward; compile
time is not counted). Every contender runs in a process of its own on all cores,
and the contenders alternate over rounds, so a slow spell of the machine falls on
each in turn. Printed, and written to docs/results/bench_train_CPU.md (CPU being LLVM's
name for this machine's processor): each contender's median step over all rounds and
the ratios.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CONTENDERS = ("wyrd", "torch-eager", "torch-compile")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def wyrd_steps(preset, B, T, warmup, steps):
    sys.path.insert(0, ROOT)
    import wyrd
    import train
    import numpy as np
    model = wyrd.Chimera(wyrd.get_config(preset))
    opt = train.AdamW(model.named_parameters(), weight_decay=0.1)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (B, T + 1))

    def step():
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        train.clip_grad_norm(model.parameters(), 1.0)
        opt.step(1e-3)
        for p in model.parameters():
            p.grad = None
    return timed(step, warmup, steps)


def torch_steps(preset, B, T, warmup, steps, compiled):
    sys.path.insert(0, ROOT)
    import wyrd
    import torch
    import torch.nn.functional as F
    from check_pytorch import TorchChimera
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    cfg = wyrd.get_config(preset)
    model = TorchChimera(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1))
    forward = torch.compile(model) if compiled else model

    def step():
        logits = forward(ids[:, :-1])
        F.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, warmup, steps)


def timed(step, warmup, steps):
    for _ in range(warmup):  # compiles (Numba, or Inductor) and warms the allocator
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def child(args):
    if args.child == "wyrd":
        times = wyrd_steps(args.preset, args.batch, args.seq, args.warmup, args.steps)
    else:
        times = torch_steps(args.preset, args.batch, args.seq, args.warmup, args.steps, args.child == "torch-compile")
    print(json.dumps(times))


def median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def machine():
    """The CPU's name and core count, as /proc/cpuinfo gives them."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["micro", "tiny"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads per contender (default: all cores)")
    ap.add_argument("--out", help="markdown file for the results (default: docs/results/bench_train_CPU.md; "
                                   "'' for none)")
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    lines = [f"machine: {machine()}; {args.threads} thread(s) each; B={args.batch} T={args.seq}; "
             f"{args.rounds} rounds of {args.steps} timed steps per contender, alternating"]
    print(lines[0], flush=True)
    table = ["| preset | contender | ms/step | tokens/s | Wyrd's speed-up |", "|---|---|---|---|---|"]
    for preset in args.presets:
        times = {c: [] for c in args.contenders}
        for r in range(args.rounds):
            order = args.contenders[r % len(args.contenders):] + args.contenders[:r % len(args.contenders)]
            for c in order:
                cmd = [sys.executable, __file__, "--child", c, "--preset", preset, "--batch", str(args.batch),
                       "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
                env = dict(os.environ, **{k: str(args.threads) for k in THREAD_VARIABLES})
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
                times[c] += json.loads(out.strip().splitlines()[-1])
        tokens = args.batch * args.seq
        med = {c: median(ts) for c, ts in times.items()}
        for c in args.contenders:
            ratio = f"{med[c] / med['wyrd']:.2f}x" if "wyrd" in med and c != "wyrd" else ""
            line = f"train {preset:5s} {c:14s} {med[c] * 1e3:8.1f} ms/step  {tokens / med[c]:8.0f} tok/s"
            print(line + (f"  (Wyrd {ratio} its tokens/s)" if ratio else ""), flush=True)
            table.append(f"| {preset} | {c} | {med[c] * 1e3:.1f} | {tokens / med[c]:,.0f} | {ratio} |")
    if args.out is None:
        import llvmlite.binding
        args.out = os.path.join(ROOT, "docs", "results", f"bench_train_{llvmlite.binding.get_host_cpu_name()}.md")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(f"# Training step: Wyrd against the PyTorch Chimera\n\n{datetime.date.today()}, "
                    f"`python bench/bench_train.py`. {lines[0]}.\n\n" + "\n".join(table) + "\n\n"
                    "A step is forward, backward, clipping the gradient norm to 1 and AdamW. PyTorch "
                    f"{_torch_version()}: the RG-LRU scan in parallel (Hillis-Steele doubling), attention "
                    "through `F.scaled_dot_product_attention` with a sliding-window mask, `F.cross_entropy`, "
                    "`clip_grad_norm_` and `torch.optim.AdamW`; `torch-compile` compiles the model "
                    "(its compile time is not counted). Each contender runs in its own process on all "
                    "cores; the contenders alternate over rounds and the medians are over all rounds' steps.\n")
        print(f"written to {os.path.relpath(args.out)}")


def _torch_version():
    import torch
    return torch.__version__


if __name__ == "__main__":
    main()
