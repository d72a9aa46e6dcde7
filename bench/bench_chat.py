"""Chat latency: time to first token and tokens/s of a reply, at the start of a
conversation and after 2,000 tokens of history (O(1) decoding state: they should match).

    python bench/bench_chat.py                         # out/wyrd.safetensors (if present) and medium
    python bench/bench_chat.py --checkpoint PATH --presets tiny medium --history 2000
    python bench/bench_chat.py --quantize int8         # the same with int8 weights

Each measurement times one user turn the way chat.py runs it: the turn's chunk
(`<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`) goes through
model.step in one call, then `new` tokens are sampled with the default sampler
(temperature 0.7, top-k 50, top-p 0.9, repetition penalty 1.1) and no stop token.
  time to first token = from the start of the turn to the first sampled id
  tokens/s            = the following new - 1 tokens over their time
"start" is right after the system prompt; "after N" after N more tokens of history.
A preset runs with random weights and random ids of the same lengths (the speed of a
step does not depend on the weights). Median and best of --repeats runs from the same
state: on a shared machine the best is the better estimate of the cost itself.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import wyrd  # noqa: E402
import quant  # noqa: E402
import checkpoint  # noqa: E402
import chat  # noqa: E402
import conversation  # noqa: E402
import sampling  # noqa: E402

import numpy as np  # noqa: E402


def time_turn(model, tok, state, chunk, new):
    """-> (seconds to the first token, tokens/s after it) for one turn from `state` (a copy is used)."""
    settings = sampling.Settings(max_tokens=new, seed=0)
    t0 = time.perf_counter()
    gen = sampling.generate(model, tok, state.copy(), chunk, settings, stop_ids=set())
    next(gen)
    t1 = time.perf_counter()
    n = sum(1 for _ in gen)
    return t1 - t0, n / (time.perf_counter() - t1)


def bench(name, model, tok, history, new, repeats):
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    if tok is not None:  # the real template and text
        system = tok.render_message("system", chat.DEFAULT_SYSTEM)[0]
        conv = conversation.Conversation(model, tok)
        chunk = tok.render_message("user", "Hello! Can you tell me a story about a little dog?")[0] + conv.assistant_prefix
    else:
        system = list(rng.integers(0, V, 16))
        chunk = list(rng.integers(0, V, 24))
    print(f"{name}: turn chunk {len(chunk)} tokens, {new} sampled, {repeats} runs per point")
    state = model.init_state(1)
    model.step(np.asarray([system]), state)
    time_turn(model, tok, state, chunk, 4)  # warm up (Numba cache, BLAS buffers)
    for label, extra in (("start", 0), (f"after {history}", history)):
        for i in range(0, extra, sampling.PREFILL_CHUNK):  # history: random ids, fed as a long turn would be
            model.step(rng.integers(0, V, (1, min(sampling.PREFILL_CHUNK, extra - i))), state)
        runs = [time_turn(model, tok, state, chunk, new) for _ in range(repeats)]
        ttft, rate = [r[0] for r in runs], [r[1] for r in runs]
        print(f"{name:24s} {label:10s} context {state.pos:5d}: first token {np.median(ttft) * 1e3:7.1f} ms "
              f"(best {min(ttft) * 1e3:7.1f}), {np.median(rate):6.1f} tok/s (best {max(rate):6.1f}), "
              f"state {state.nbytes() / 1e6:.2f} MB", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=chat.DEFAULT_CHECKPOINT)
    ap.add_argument("--presets", nargs="*", default=["medium"], help="random-weight presets (default: medium)")
    ap.add_argument("--history", type=int, default=2000)
    ap.add_argument("--new", type=int, default=64, help="tokens sampled per turn (default: 64)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quantize", choices=["int8"], help="int8 weights, as chat.py --quantize runs them")
    args = ap.parse_args()
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the start")
    kind = f", {args.quantize}" if args.quantize else ""
    if os.path.exists(args.checkpoint):
        model, tok, _ = checkpoint.load(args.checkpoint, quantize=args.quantize)
        bench(f"{os.path.basename(args.checkpoint)} ({model.num_params() / 1e6:.1f}M{kind})", model, tok,
              args.history, args.new, args.repeats)
    else:
        print(f"no checkpoint at {args.checkpoint}: skipped (add its preset to --presets instead)")
    for preset in args.presets:
        model = wyrd.Chimera(preset)
        if args.quantize:
            model = quant.quantize(model)
        bench(f"{preset} random ({model.num_params() / 1e6:.1f}M{kind})", model, None, args.history,
              args.new if preset in ("nano", "tiny") else min(args.new, 32), args.repeats)


if __name__ == "__main__":
    main()
