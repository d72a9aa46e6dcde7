"""Decoding speed by entry point: `chat.py [--quantize int8]` against a plain script
that does what the README's Python API shows (checkpoint.load(path[, quantize="int8"]),
then sampling.complete), as a notebook would.

    python bench/bench_entry.py                        # a random-weight medium model, int8
    python bench/bench_entry.py --float32              # the same in float32
    python bench/bench_entry.py --checkpoint PATH --rounds 5

Each route runs in its own process, alternated over rounds, with the same prompt,
sampler and seed, so both sample the same tokens. A route's tokens/s come from two
reply lengths: (long - short) / (t_long - t_short) of whole-process wall times, so
loading, compiling and the prompt cancel out. Prints each round's rates and the
median ratio plain script / chat.py, and writes them to docs/results/bench_entry_MODE.md.
"""
import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench_train import machine

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PROMPT = "Once upon a time there was a little dog who"
INT8_ARG = ', quantize="int8"'

PLAIN = """\
import sys
sys.path.insert(0, {root!r})
import checkpoint
import sampling

model, tok, _ = checkpoint.load(sys.argv[1], quantize=sys.argv[3] if sys.argv[3] != "none" else None)
settings = sampling.Settings(max_tokens=int(sys.argv[2]), seed=0)
for piece in sampling.complete(model, tok, {prompt!r}, settings):
    sys.stdout.write(piece)
"""


def wall(cmd):
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed: {r.stderr.strip()[-300:]}")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a float or int8 checkpoint with a tokenizer (default: random medium)")
    ap.add_argument("--float32", action="store_true", help="decode in float32 (a float checkpoint), not int8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--long", type=int, default=272)
    ap.add_argument("--out", help="where to write the results (default: docs/results/bench_entry_MODE.md; '' for "
                                  "nowhere)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="wyrd-entry-")
    path = args.checkpoint
    if path is None:
        path = os.path.join(tmp, f"medium-{'f32' if args.float32 else 'int8'}.safetensors")
        subprocess.run([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {ROOT!r})
import checkpoint, corpus, wyrd
from tokenizer import Tokenizer
tok = Tokenizer.train(corpus.builtin_stories(300, seed=0), 1000)
checkpoint.save({path!r}, wyrd.Chimera("medium", seed=0), tok, dtype={'f32' if args.float32 else 'int8'!r})
"""], check=True)
    script = os.path.join(tmp, "plain_decode.py")
    with open(script, "w") as f:
        f.write(PLAIN.format(root=ROOT, prompt=PROMPT))
    quantize = [] if args.float32 else ["--quantize", "int8"]
    mode = "float32" if args.float32 else "int8"
    routes = {
        "chat.py": lambda n: [sys.executable, "chat.py", "--checkpoint", path, *quantize, "--raw",
                              "--prompt", PROMPT, "--max-tokens", str(n), "--seed", "0"],
        "plain script": lambda n: [sys.executable, script, path, str(n), "none" if args.float32 else "int8"],
    }
    print(f"{os.cpu_count()} cores; {path}; {args.long - args.short} tokens between the two reply lengths")
    rates = {name: [] for name in routes}
    for r in range(args.rounds):
        for name, cmd in (routes.items() if r % 2 == 0 else reversed(routes.items())):
            t_short, t_long = wall(cmd(args.short)), wall(cmd(args.long))
            rates[name].append((args.long - args.short) / (t_long - t_short))
        print(f"round {r + 1}: " + ", ".join(f"{name} {v[-1]:.1f} tok/s" for name, v in rates.items()), flush=True)
    ratios = [p / c for p, c in zip(rates["plain script"], rates["chat.py"])]
    summary = (f"median: chat.py {statistics.median(rates['chat.py']):.1f} tok/s, plain script "
               f"{statistics.median(rates['plain script']):.1f} tok/s; plain / chat.py = "
               f"{statistics.median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    print(summary)
    out = os.path.join(ROOT, "docs", "results", f"bench_entry_{mode}.md") if args.out is None else args.out
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(f"# {mode} decoding by entry point\n\n{datetime.date.today()}, `python bench/bench_entry.py"
                    f"{' --float32' if args.float32 else ''}{' --checkpoint ...' if args.checkpoint else ''} "
                    f"--rounds {args.rounds}`, {machine()}.\n\n"
                    f"`chat.py{'' if args.float32 else ' --quantize int8'}` against a plain script that calls "
                    f"`checkpoint.load(path{'' if args.float32 else INT8_ARG})` and "
                    "`sampling.complete`, as a notebook would; tokens/s from two reply "
                    f"lengths ({args.short} and {args.long} tokens), each route in its own process, alternated.\n\n"
                    + "\n".join(f"- round {i + 1}: chat.py {c:.1f} tok/s, plain script {p:.1f} tok/s"
                                 for i, (c, p) in enumerate(zip(rates["chat.py"], rates["plain script"])))
                    + f"\n\n{summary}\n")


if __name__ == "__main__":
    main()
