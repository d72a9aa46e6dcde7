# %% [markdown]
# # Train a tiny Wyrd
#
# The whole recipe of `python train.py`, about fifteen minutes of 2 CPU cores:
#
# 1. a byte-level BPE tokenizer trained on the built-in stories and chats;
# 2. **pretraining** on stories (next-token prediction on every token);
# 3. **fine-tuning** on ChatML conversations, where the loss is taken only on
#    the assistant's tokens and its closing `<|im_end|>`.
#
# We use the public functions of `train.py` (`pretrain`, `finetune`) and the
# checks of `corpus.py` (`sample_stories`, `reply_check`, `fact_check`), read the
# JSONL logs they write, and look at samples before and after each phase. The
# settings are the default run's, so this page shows what `python train.py`
# does, step by step.

# %%
import report  # first: puts the repo root on sys.path

import os
import itertools
import json
import math
import tempfile
import time
from dataclasses import replace

import numpy as np

import svg
import corpus
import data
import train
import wyrd

args = report.parse_args("Train a tiny Wyrd: loss curves of pretraining and fine-tuning, samples before and after.")
rep = report.Report(args, "03_train_tiny")
quick = args.quick

# the default run's recipe (train.PRETRAIN, train.FINETUNE, the micro preset, all of the built-in corpus)
PRESET = "nano" if quick else "micro"
STORIES, CHATS = ("builtin:400", "builtin:300") if quick else ("builtin", "builtin")
PRE = replace(train.PRETRAIN, steps=12 if quick else train.PRETRAIN.steps, seq_len=64 if quick else 256,
              warmup=3 if quick else train.PRETRAIN.warmup, eval_every=4 if quick else 100,
              eval_batches=2 if quick else 8, ckpt_every=10 ** 9, log_every=4 if quick else 100)
FT = replace(train.FINETUNE, steps=8 if quick else train.FINETUNE.steps, seq_len=96 if quick else 384,
             warmup=2 if quick else train.FINETUNE.warmup, eval_every=4 if quick else 100,
             eval_batches=2 if quick else 8, ckpt_every=10 ** 9, log_every=4 if quick else 100)
N_SAMPLES, MAX_NEW = (2, 24) if quick else (corpus.STORY_SAMPLES, 300)
N_CHATS, CHAT_NEW = (3, 16) if quick else (50, 200)  # the default run's reply check
work = tempfile.mkdtemp(prefix="wyrd-train-tiny-")

# %% [markdown]
# ## The tokenizer
#
# One vocabulary for stories and ChatML: it is trained on both, with the role
# names as ChatML writes them ("user\n..."), as `train.run_default` does.

# %%
t0 = time.time()
texts = itertools.chain(data.tokenizer_texts([STORIES]), data.tokenizer_texts([CHATS], chat=True))
tok = train.train_tokenizer(texts, wyrd.get_config(PRESET).vocab_size)
print(tok, f"{time.time() - t0:.1f}s")

# %% [markdown]
# ## Before training
#
# The untrained model (the same seed `pretrain` will use) is a uniform guesser:
# its loss is close to ln(vocab size) and its samples are random tokens.

# %%
config = replace(wyrd.get_config(PRESET), vocab_size=tok.vocab_size)
untrained = wyrd.Chimera(config, seed=PRE.seed)
train_tok, val_tok, _ = data.load_tokens([STORIES], tok, work)
story_val = data.Rows.stream(val_tok, PRE.seq_len, tok.eot_id)
loss_before = train.evaluate(untrained, story_val, PRE)
# the loss of a model that knows token frequencies but ignores context: the unigram entropy
counts = np.bincount(np.asarray(train_tok[:, 0]), minlength=tok.vocab_size)
p = counts[counts > 0] / counts.sum()
unigram = float(-(p * np.log(p)).sum())
stories_before = corpus.sample_stories(untrained, tok, n=N_SAMPLES, max_new=MAX_NEW)
print(f"untrained held-out loss {loss_before:.3f} (ln V = {math.log(tok.vocab_size):.3f}, "
      f"unigram entropy {unigram:.3f})")
print(stories_before[0][:200])

# %% [markdown]
# ## Pretraining
#
# `train.pretrain` packs the stories into one token stream, cuts it into rows of
# `seq_len + 1` tokens, and runs AdamW with warmup and a cosine schedule. It logs
# every step to a JSONL file beside the checkpoint (`train.log_path_of`).

# %%
out_pre = os.path.join(work, "pretrain.safetensors")
t0 = time.time()
model, tok, pre = train.pretrain([STORIES], out_pre, PRESET, cfg=PRE, tok=tok)
pre_time = time.time() - t0
stories_after = corpus.sample_stories(model, tok, n=N_SAMPLES, max_new=MAX_NEW)
print(f"pretraining: {pre_time:.0f}s, held-out {pre['val_loss']:.3f}")
print(stories_after[0])

# %% [markdown]
# ## Fine-tuning on conversations
#
# Before fine-tuning, we ask the pretrained model the first user turn of held-out
# conversations (`corpus.reply_check`): it has never seen ChatML, so it rarely
# closes its reply with `<|im_end|>`. `train.finetune` then trains on packed
# conversations with the assistant-only loss mask.

# %%
chat_train, chat_val_tok, _ = data.load_tokens([CHATS], tok, work, chat=True)
chat_val = data.Rows.packed(chat_val_tok, FT.seq_len, tok.eot_id)
chat_loss_before = train.evaluate(model, chat_val, FT)
rate_before, replies_before = corpus.reply_check(model, tok, n=N_CHATS, max_new=CHAT_NEW)

out_ft = os.path.join(work, "chat.safetensors")
t0 = time.time()
model, tok, ft = train.finetune([CHATS], None, out_ft, FT, model=model, tok=tok, meta=pre["meta"])
ft_time = time.time() - t0
rate_after, replies_after = corpus.reply_check(model, tok, n=N_CHATS, max_new=CHAT_NEW)
print(f"fine-tuning: {ft_time:.0f}s, held-out {ft['val_loss']:.3f}; replies ending with <|im_end|>: "
      f"{rate_before:.0%} before, {rate_after:.0%} after")

# %% [markdown]
# ## Loss curves
#
# The logs hold the training loss of every step, the held-out loss every
# `eval_every` steps, and a final record with both losses of the final model.
# Cross-entropy is in nats per token; held-out is the last 5% of the stories
# (or chats), never trained on. Two reference lines: ln(vocab), the loss of a
# uniform guess, and the unigram entropy of the training tokens, the loss of a
# model that knows how often each token occurs but ignores the context. Every
# model gets there within a few dozen steps; from the spec's reference init the
# hybrid then sat on that plateau for a hundred steps (docs/04), from Wyrd's it
# goes straight through. Everything below the line is learned from the context.
# Fine-tuning counts assistant tokens only; its step 0 is the pretrained model,
# which has never seen the ChatML template.


# %%
def read_log(out):
    with open(train.log_path_of(out), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if not r.get("final")]
    return steps, [r for r in records if r.get("final")][-1]


def curves(records, final, val_start):
    return [{"label": "train (per step)", "x": [r["step"] for r in records], "y": [r["loss"] for r in records],
             "width": 1.2},
            {"label": "held-out", "x": [0] + [r["step"] for r in records if "val_loss" in r] + [final["step"]],
             "y": [val_start] + [r["val_loss"] for r in records if "val_loss" in r] + [final["val_loss"]],
             "marker": True}]


pre_log, pre_final = read_log(out_pre)
ft_log, ft_final = read_log(out_ft)
tok_s = {"pretrain": pre_log[-1]["tokens_per_s"], "finetune": ft_log[-1]["tokens_per_s"]}

rep.md(f"""
A `{PRESET}` model ({model.num_params():,} parameters: d_model {config.d_model}, {config.n_layers} layers,
attention every {config.attention_every_n}rd, window {config.sliding_window}), a {tok.vocab_size}-token BPE
trained on the built-in stories and chats; ln(vocab) = {math.log(tok.vocab_size):.2f}, unigram entropy
{unigram:.2f}.

| phase | data | steps x batch x length | tokens | lr (peak → floor) | wall time | tokens/s |
|---|---|---|---|---|---|---|
| pretraining | `{STORIES}` stories | {PRE.steps} x {PRE.batch_size} x {PRE.seq_len} | {PRE.steps * PRE.batch_size * PRE.seq_len:,} | {PRE.lr:g} → {PRE.min_lr:g} | {pre_time:.0f} s | {tok_s['pretrain']:,.0f} |
| fine-tuning | `{CHATS}` chats | {FT.steps} x {FT.batch_size} x {FT.seq_len} | {FT.steps * FT.batch_size * FT.seq_len:,} | {FT.lr:g} → {FT.min_lr:g} | {ft_time:.0f} s | {tok_s['finetune']:,.0f} |
""")
rep.figure("03_pretrain_loss.svg", svg.line_plot(
    None, curves(pre_log, pre_final, loss_before), title="Pretraining on stories", xlabel="optimizer step",
    ylabel="loss (nats/token)", legend="bottom left",
    hlines=[(math.log(tok.vocab_size), "uniform guess"), (unigram, "unigram entropy")]), "pretraining loss")
rep.figure("03_finetune_loss.svg", svg.line_plot(
    None, curves(ft_log, ft_final, chat_loss_before), title="Fine-tuning on conversations (assistant tokens)",
    xlabel="optimizer step", ylabel="loss (nats/token)", legend="bottom left"), "fine-tuning loss")
rep.table(["", "before", "after: train", "after: held-out"],
          [["pretraining (stories)", loss_before, pre_final["train_loss"], pre_final["val_loss"]],
           ["fine-tuning (assistant tokens)", chat_loss_before, ft_final["train_loss"], ft_final["val_loss"]],
           ["replies that end with <\\|im_end\\|>", f"{rate_before:.0%}", "", f"{rate_after:.0%} of {N_CHATS}"]])
rep.record(loss_before=loss_before, pretrain_train_loss=pre_final["train_loss"],
           pretrain_val_loss=pre_final["val_loss"], chat_loss_before=chat_loss_before,
           finetune_train_loss=ft_final["train_loss"], finetune_val_loss=ft_final["val_loss"],
           reply_rate_before=rate_before, reply_rate_after=rate_after, ln_vocab=math.log(tok.vocab_size),
           unigram_entropy=unigram,
           pretrain_seconds=pre_time, finetune_seconds=ft_time, tokens_per_s=tok_s, params=model.num_params())

# %% [markdown]
# ## What it learned: names and facts
#
# The default run's two checks of what the model took from its context
# (`corpus.names_per_story`, `corpus.fact_check`): distinct character names in
# stories sampled after pretraining (the built-in stories have 1.6; a model that
# cannot copy a name from a few sentences back brings in a new one every few
# sentences), and greedy replies to the corpus's world facts after fine-tuning.

# %%
names = corpus.names_per_story(stories_after)
facts, wrong = corpus.fact_check(model, tok)
print(f"names per story {names:.2f}; facts {facts} of {len(corpus.FACTS)}")
rep.table(["distinct names per sampled story", "world facts answered exactly"],
          [[f"{names:.2f} ({len(stories_after)} stories)", f"{facts} of {len(corpus.FACTS)}"]])
rep.record(names_per_story=names, facts=facts)

# %% [markdown]
# ## Samples
#
# Stories start from "Once upon a time" and friends (`corpus.sample_stories`);
# chat replies answer the first user turn of held-out conversations
# (`corpus.reply_check`). Both sample with chat.py's default settings.


# %%
def quote(text):
    return "```text\n" + text.strip().replace("```", "'''") + "\n```"


rep.md("### Stories before pretraining (untrained model)")
rep.md(quote(stories_before[0][:300] + " ..."))
rep.md("### Stories after pretraining")
for s in stories_after[:3]:
    rep.md(quote(s))
rep.md("### Chat replies before and after fine-tuning")
for (prompt, before), (_, after) in list(zip(replies_before, replies_after))[:3]:
    user = [m["content"] for m in prompt if m["role"] == "user"][-1]
    rep.md(f"**user:** {user}\n\n*pretrained only:*\n{quote(before)}\n*fine-tuned:*\n{quote(after)}")
rep.save()
