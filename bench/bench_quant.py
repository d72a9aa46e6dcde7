"""int8 quality: a checkpoint's held-out loss in float32 and with int8 weights, and how
often their greedy replies agree.

    python bench/bench_quant.py                                   # out/wyrd.safetensors
    python bench/bench_quant.py --checkpoint out/ts.safetensors --text tinystories_train_4k.txt --no-chat

held-out loss  = mean nats/token over every held-out row, split as train.py splits
                 (the last 5% of the built-in stories and chats, and of --text)
bits per byte  = nats/token / ln 2 / UTF-8 bytes per token of those rows
decode path    = the same loss on the first 64 rows fed one token at a time through
                 step, as chat decodes (int8: the block kernels, int16 activations)
greedy match   = share of the default run's held-out prompts (the reply check's 50)
                 whose first 20 greedy reply tokens are the same in float32 and int8
"""
import argparse
import math
import os
import sys
import tempfile
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import wyrd  # noqa: E402
import checkpoint  # noqa: E402
from autograd import cross_entropy  # noqa: E402
import numpy as np  # noqa: E402
import quant  # noqa: E402
import corpus  # noqa: E402
import train  # noqa: E402
from data import Rows, load_tokens  # noqa: E402
from sampling import Settings, generate  # noqa: E402


def held_out(models, tok, source, chat, seq_len, tmp):
    """Mean loss of each model over every held-out row of `source`, and bits per byte."""
    _, val, _ = load_tokens([source], tok, tmp, chat=chat)
    rows = (Rows.packed if chat else Rows.stream)(val, seq_len, tok.eot_id)
    cfg = replace(train.PRETRAIN, seq_len=seq_len)
    losses = {name: train.evaluate(m, rows, cfg, batches=-(-len(rows) // cfg.batch_size)) for name, m in models.items()}
    per_byte = train.bytes_per_token(val[:, 0], tok)
    label = f"{os.path.basename(source)} {'chats' if chat else 'text'}"
    print(f"{label:28s} {len(rows):4d} held-out rows: " + ", ".join(
        f"{name} {loss:.4f} nats/token ({loss / math.log(2) / per_byte:.4f} bits/byte)" for name, loss in losses.items())
        + f"; int8 - float32 = {losses['int8'] - losses['float32']:+.4f} nats/token")
    decoded = {name: decoded_loss(m, rows, quant.MATVEC_ROWS, 64) for name, m in models.items()}
    print(f"{'':28s} the first {min(64, len(rows))} rows fed a token at a time through step (the decode path): "
          + ", ".join(f"{name} {loss:.4f}" for name, loss in decoded.items())
          + f"; int8 - float32 = {decoded['int8'] - decoded['float32']:+.4f} nats/token")


def decoded_loss(model, rows, batch, n):
    """Mean loss over the first n rows with every token consumed by model.step as in
    chat (for int8: the block kernels and the int16-activation matvec), not by a
    forward over the whole row (for int8: BLAS on dequantised weights)."""
    total = count = 0.0
    for i in range(0, min(n, len(rows)), batch):
        x, y, m = rows.batch(list(range(i, min(i + batch, n, len(rows)))))
        state = model.init_state(len(x))
        for t in range(x.shape[1]):
            logits = wyrd.Tensor(model.step(x[:, t:t + 1], state).astype(np.float64))
            if m[:, t].any():  # cross_entropy is the mean over unmasked rows
                total += float(cross_entropy(logits, y[:, t], m[:, t]).data) * float(m[:, t].sum())
                count += float(m[:, t].sum())
    return total / count


def greedy_match(models, tok, n=50, first=20):
    """Share of held-out prompts whose first `first` greedy reply tokens are the same."""
    same = 0
    for chat in corpus.builtin_chats(n, seed=corpus.HELD_OUT_SEED):
        prompt = chat[:next(i for i, m in enumerate(chat) if m["role"] == "assistant")]
        ids, _ = tok.render_chat(prompt, add_generation_prompt=True)
        replies = [list(generate(m, tok, None, ids, Settings(temperature=0, max_tokens=first)))
                   for m in models.values()]
        same += replies[0] == replies[1]
    print(f"greedy replies to {n} held-out prompts: the first {first} tokens are identical in {same} "
          f"({same / n:.0%})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="out/wyrd.safetensors")
    ap.add_argument("--text", help="a story file (TinyStories .txt, ...) whose held-out 5%% is also evaluated")
    ap.add_argument("--no-chat", action="store_true", help="skip the built-in chats and greedy replies")
    args = ap.parse_args()
    model, tok, _ = checkpoint.load(args.checkpoint)
    models = {"float32": model, "int8": checkpoint.load(args.checkpoint, quantize="int8")[0]}
    seq_len = min(256, model.config.max_seq_len)
    print(f"{args.checkpoint}: {model.num_params() / 1e6:.2f}M parameters")
    with tempfile.TemporaryDirectory() as tmp:
        held_out(models, tok, "builtin", False, seq_len, tmp)
        if not args.no_chat:
            held_out(models, tok, "builtin", True, train.FINETUNE.seq_len, tmp)
        if args.text:
            held_out(models, tok, args.text, False, seq_len, tmp)
    if not args.no_chat:
        greedy_match(models, tok)
