"""Model benchmark: training-step throughput and utilisation, decode speed in float32
and int8, and memory.

    python bench/bench_model.py                 # all of the parts below
    python bench/bench_model.py --only decode   # one part: tiny | medium | decode | load | chat

utilisation = 6 x parameters x tokens/s / (float32 matmul FLOP/s measured in the same run)
decode bound = matrix-vector GB/s / bytes of weights read per token (float32: 4 per
    weight; int8: 1 per weight + a float32 scale per 64 + the float32 norms and vectors)
load memory = peak resident size added by checkpoint.load of a medium checkpoint / the file's size
    (a float32 file, and the int8 file of the same weights: checkpoint.save(dtype="int8"))
chat memory = peak resident size of a `chat.py --prompt` process on a medium checkpoint

Decoding is measured in processes of their own, float32 and int8 alternating, and
written to docs/results/decode_CPU.md, CPU being LLVM's name for this machine's
(the speed-up depends on it).
Each memory figure comes from a fresh process (/proc VmHWM, or wait4 for chat.py)
started by this small parent, never by a process that has held a medium model.
"""
import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from bench_kernels import best_of, matmul_gflops  # noqa: E402
from bench_train import machine  # noqa: E402
import wyrd  # noqa: E402
import checkpoint  # noqa: E402
import quant  # noqa: E402
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


def weight_bytes(model):
    """Bytes of weights one decoded token reads: every matrix (the tied head included) once."""
    int8 = sum(m.q.nbytes + m.scale.nbytes + (0 if m.bias is None else m.bias.nbytes) for m in quant.int8_linears(model))
    return sum(p.data.nbytes for p in model.parameters()) + int8


def int8_matvec_gbps(float32_gbps, rounds=4, n=64, rows=4096, cols=1024):
    """The int8 kernel's own matrix-vector rate in GB/s of weights and scales read: n
    matrices of a model's row length (the input vector stays in L1), 285 MB in all (past
    the 32 MB L3), one after another as a decoded token reads them. Each round is paired
    with float32_gbps() measured just before it: -> [(int8 GB/s, float32 GB/s)]."""
    rng = np.random.default_rng(0)
    mats = [quant.Int8Linear(rng.integers(-127, 128, (rows, cols), dtype=np.int8),
                             rng.random((rows, cols // quant.GROUP), dtype=np.float32)) for _ in range(n)]
    x = wyrd.Tensor(rng.standard_normal((1, cols), dtype=np.float32))
    nbytes = sum(m.q.nbytes + m.scale.nbytes for m in mats)

    def all_of_them():
        for m in mats:
            m(x)
    pairs = []
    with wyrd.no_grad():
        for _ in range(rounds):
            f32 = float32_gbps()
            pairs.append((nbytes / best_of(all_of_them, repeat=5) / 1e9, f32))
    return pairs


def decode_rate(preset, contexts, rounds, tokens, quantize):
    """In this process: prefill seconds at each context, then `rounds` rounds of a
    float32 matvec measurement (the bound at that moment) followed by `tokens`
    decoded tokens; one JSON line for the parent."""
    model = Chimera(get_config(preset), init="reference")  # every matrix nonzero, as in a trained model
    if quantize:
        model = quant.quantize(model)
    rng = np.random.default_rng(0)
    model.step(rng.integers(0, model.config.vocab_size, (1, 40)), model.init_state(1))  # load the kernels
    big, v = np.full((32768, 8192), 0.5, np.float32), np.ones(8192, np.float32)  # 1 GB: past the L3 cache

    def matvec_now():
        time.sleep(0.05)  # the other library's threads stop spinning and leave the cores
        rate = big.nbytes / best_of(lambda: big @ v, repeat=3) / 1e9
        time.sleep(0.05)
        return rate
    gbps, results = [], {}
    for ctx in contexts:
        prompt = rng.integers(0, model.config.vocab_size, (1, ctx))
        ttft = np.inf
        for _ in range(5 if ctx <= 512 else 1):  # the best of 5 where a prefill is short enough
            state = model.init_state(1)
            t = time.perf_counter()
            logits = model.step(prompt, state)
            ttft = min(ttft, time.perf_counter() - t)
        tok = np.array([[int(logits.argmax())]])
        pairs = []
        for _ in range(rounds):
            gbps.append(matvec_now())
            times = []
            for _ in range(tokens):
                t = time.perf_counter()
                tok[0, 0] = int(model.step(tok, state).argmax())
                times.append(time.perf_counter() - t)
            pairs.append((1 / float(np.median(times)), gbps[-1]))  # the median token: robust to a stall
        results[ctx] = (ttft, pairs)
    kernel = int8_matvec_gbps(matvec_now) if quantize else []
    print(json.dumps({"gbps": gbps, "kernel_gbps": kernel, "bytes": weight_bytes(model), "results": results}))


def decode_side_by_side(runs=3):
    """float32 and int8 decoding, each in processes of its own, alternating so a busy
    spell of the machine hits both.
    Each is compared with its own bandwidth bound, bytes a token / matvec GB/s, two ways:
    - against the fastest matvec of the whole benchmark, with the best of its rounds:
      a busy moment of the shared host can only lower this figure;
    - round by round against the matvec measured just before that round's tokens
      (the median of those ratios): the host's memory rate swings by 1.5x from minute
      to minute here, and this compares each rate with the memory it had."""
    rates, ttfts, gbps, kernel_gbps, nbytes = {}, {}, [], [], {}
    for _ in range(runs):
        for name in ("float32", "int8"):
            out = subprocess.run([sys.executable, __file__, "--decode-child", name], check=True,
                                 stdout=subprocess.PIPE, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            gbps += r["gbps"]
            kernel_gbps += r["kernel_gbps"]
            nbytes[name] = r["bytes"]
            for ctx, (ttft, pairs) in r["results"].items():
                ttfts[name, int(ctx)] = min(ttfts.get((name, int(ctx)), np.inf), ttft)
                rates.setdefault((name, int(ctx)), []).extend(pairs)
    kernel = np.array(kernel_gbps)  # (int8 kernel GB/s, float32 matvec GB/s measured just before)
    back_to_back = kernel[:, 0] / kernel[:, 1]
    lines = []  # shown, then written to the results file
    lines.append(f"machine: {os.cpu_count()} cores, float32 matvec {min(gbps):.1f}-{max(gbps):.1f} GB/s "
          f"(median {np.median(gbps):.1f}), int8 kernel matvec {kernel[:, 0].min():.1f}-{kernel[:, 0].max():.1f} GB/s "
          f"(back to back with float32's: {np.median(back_to_back):.2f}x, "
          f"{back_to_back.min():.2f}-{back_to_back.max():.2f}x); "
          f"{runs} alternating runs each, {len(rates['int8', 64])} rounds of 16 tokens a context")
    for ctx in sorted({c for _, c in rates}):
        for name in ("float32", "int8"):
            pairs = np.array(rates[name, ctx])
            best, bound = pairs[:, 0].max(), max(gbps) * 1e9 / nbytes[name]
            paired = np.median(pairs[:, 0] * nbytes[name] / (pairs[:, 1] * 1e9))
            lines.append(f"decode medium {name:7s} context {ctx:5d}: prefill {ttfts[name, ctx] * 1e3:6.0f} ms, "
                  f"{best:6.1f} tok/s ({best / bound * 100:5.1f}% of its {bound:5.1f} tok/s bound: "
                  f"{nbytes[name] / 1e6:.0f} MB a token); round by round {paired * 100:5.1f}% "
                  f"(median {np.median(pairs[:, 0]):.1f} tok/s)")
        f_rate, q_rate = (np.array(rates[n, ctx])[:, 0] for n in ("float32", "int8"))
        kernel_bound = kernel[:, 0].max() * 1e9 / nbytes["int8"]
        lines.append(f"decode medium int8    context {ctx:5d}: {q_rate.max() / kernel_bound * 100:5.1f}% of the "
              f"{kernel_bound:5.1f} tok/s the int8 kernel's own matvec rate allows")
        lines.append(f"decode medium int8 / float32 context {ctx:5d}: {q_rate.max() / f_rate.max():.2f}x the tokens/s "
              f"(medians {np.median(q_rate) / np.median(f_rate):.2f}x), "
              f"prefill {ttfts['int8', ctx] / ttfts['float32', ctx]:.2f}x the time")
    print("\n".join(lines))
    import llvmlite.binding
    cpu = llvmlite.binding.get_host_cpu_name()
    out = os.path.join(ROOT, "docs", "results", f"decode_{cpu}.md")
    with open(out, "w", encoding="utf-8") as f:
        f.write(f"# Decoding medium, float32 and int8 (LLVM's CPU: {cpu})\n\n{datetime.date.today()}, "
                f"`python bench/bench_model.py --only decode`. machine: {machine()}\n\n```\n" + "\n".join(lines) + "\n```\n")
    print(f"written to {os.path.relpath(out)}")


def peak_rss():
    """This process's peak resident bytes (VmHWM: unlike ru_maxrss it starts afresh at exec)."""
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) * 1024


def load_memory(path, quantize):
    """Peak resident bytes added by loading a checkpoint, in this (fresh) process."""
    before = peak_rss()
    t = time.perf_counter()
    checkpoint.load(path, quantize=quantize or None)
    took = time.perf_counter() - t
    added = peak_rss() - before
    size = os.path.getsize(path)
    source = "int8 file" if path.endswith(".int8.safetensors") else "float32 file"
    print(f"load medium {quantize or 'float32':7s} from the {source:12s}: {size / 1e9:.2f} GB in {took:.1f} s, "
          f"peak RSS added {added / 1e9:.2f} GB = {added / size:.2f}x the file")


def make_medium(path):
    """A medium checkpoint with random weights and a ChatML tokenizer of medium's 32,000
    tokens, for chat.py: a tokenizer's tables are ~12 MB of a chat process, so a toy
    one (300 tokens) made int8's share of float32's memory look 0.7 points smaller."""
    from corpus import builtin_stories
    from tokenizer import Tokenizer
    rng = np.random.default_rng(0)
    # the built-in stories hold ~2,000 merges; made-up words give the rest
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(4, 9))) for _ in range(40000)]
    texts = builtin_stories(2000) + [" ".join(words[i:i + 20]) for i in range(0, len(words), 20)] * 3
    config = get_config("medium")
    tok = Tokenizer.train(texts, vocab_size=config.vocab_size)
    assert tok.vocab_size == config.vocab_size, tok
    model = Chimera(config, init="reference")
    checkpoint.save(path, model, tok)
    checkpoint.save(path.replace(".safetensors", ".int8.safetensors"), model, tok, dtype="int8")


def chat_memory(path, int8_path):
    """Peak resident size of `chat.py --prompt ...` on a medium checkpoint: float32, and
    int8 from the float file and from the int8 file."""
    peak = {}
    for name, file, quantize in (("float32", path, []), ("int8", path, ["--quantize", "int8"]),
                                 ("int8 from the int8 file", int8_path, ["--quantize", "int8"])):
        cmd = [sys.executable, os.path.join(ROOT, "chat.py"), "--checkpoint", file, "--prompt", "Tell me a story.",
               "--max-tokens", "32", "--temperature", "0", *quantize]
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        assert status == 0, f"{cmd} failed"
        peak[name] = usage.ru_maxrss * 1024
        print(f"chat medium {name}: peak RSS {peak[name] / 1e9:.3f} GB "
              f"(load, a 32-token reply and exit in {time.perf_counter() - t:.1f} s)")
    print(f"chat medium int8 / float32 peak RSS: {peak['int8'] / peak['float32'] * 100:.1f}% "
          f"(from the int8 file: {peak['int8 from the int8 file'] / peak['float32'] * 100:.1f}%)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["tiny", "medium", "decode", "load", "chat"], default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--decode-child", choices=["float32", "int8"], help=argparse.SUPPRESS)
    ap.add_argument("--load-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--make-medium", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_child:
        load_memory(*args.load_child)
        sys.exit()
    if args.make_medium:
        make_medium(args.make_medium)
        sys.exit()
    if args.decode_child:
        decode_rate("medium", [64, 4096], 4, 16, args.decode_child == "int8")
        sys.exit()
    # each part that holds a medium model runs in a process of its own, so this one stays small
    if args.only in (None, "load", "chat"):
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            path, int8_path = os.path.join(tmp, "medium.safetensors"), os.path.join(tmp, "medium.int8.safetensors")
            subprocess.run([sys.executable, __file__, "--make-medium", path], check=True)
            if args.only in (None, "load"):
                for file, quantize in ((path, ""), (path, "int8"), (int8_path, "int8")):
                    subprocess.run([sys.executable, __file__, "--load-child", file, quantize], check=True)
            if args.only in (None, "chat"):
                chat_memory(path, int8_path)
    if args.only in (None, "decode"):
        decode_side_by_side()
    if args.only in ("load", "chat", "decode"):
        sys.exit()
    peak = matmul_gflops()
    print(f"machine: {os.cpu_count()} cores, float32 matmul {peak:.0f} GFLOP/s")
    if args.only in (None, "tiny"):
        train_step_rate("tiny", 8, 256, args.steps, peak)
    if args.only in (None, "medium"):
        train_step_rate("medium", 1, 256, args.steps, peak)
