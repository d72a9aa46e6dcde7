"""Train Wyrd: pretraining, chat fine-tuning, AdamW, checkpoints, exact resume.

    python train.py                       # everything, offline: tokenizer, pretrain and fine-tune on
                                          # the built-in corpus -> out/wyrd.safetensors
    python train.py pretrain --data TinyStoriesV2-GPT4-train.txt --preset tiny --out out/ts.safetensors
    python train.py finetune --data oasst.trees.jsonl.gz builtin --init out/ts.safetensors --out out/chat.safetensors
    python train.py pretrain ... --resume     # continue a stopped run from its last checkpoint, bit for bit
    python train.py pretrain ... --overwrite  # start over: without it, an existing run is never replaced

Read top to bottom: configuration, AdamW and the schedule, the training loop,
checkpoints, the final report, the commands. The data side (loaders, the token
cache, batches, `python data.py download|convert`) is data.py; the built-in
corpus is corpus.py. `python train.py COMMAND --help` lists every flag with its
default.
"""
import wyrd  # first: the thread policy (runtime.py) must be in place when NumPy loads
import tensorfile
import checkpoint

import argparse
import contextlib
import itertools
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
from numba import njit, prange

import corpus
from autograd import FAST, N_PARTIAL, no_grad
from data import DataError, Rows, load_tokens, tokenizer_texts
from runtime import atomic_write
from tokenizer import Tokenizer, TokenizerError

# ----------------------------------------------------------------------------
# Configuration


def _flag(default, help):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Each field is a flag of `train.py pretrain|finetune` (--batch-size for batch_size)."""
    steps: int = _flag(2500, "optimizer steps")
    batch_size: int = _flag(8, "sequences per micro-batch")
    grad_accum: int = _flag(1, "micro-batches per optimizer step (gradient accumulation)")
    seq_len: int = _flag(256, "tokens per sequence (at most the model's max_seq_len)")
    lr: float = _flag(3e-3, "peak learning rate")
    min_lr: float = _flag(3e-4, "final learning rate of the cosine decay")
    warmup: int = _flag(30, "linear warmup steps")
    weight_decay: float = _flag(0.1, "AdamW decoupled weight decay (matrices only)")
    grad_clip: float = _flag(1.0, "clip the global gradient norm to this (0: off)")
    eval_every: int = _flag(100, "steps between held-out evaluations (0: only at the end)")
    eval_batches: int = _flag(8, "batches per held-out evaluation")
    ckpt_every: int = _flag(100, "steps between checkpoints (and always at the end and on Ctrl-C)")
    log_every: int = _flag(10, "steps between progress lines (the JSONL log gets every step)")
    seed: int = _flag(0, "seed of the model init and the data order")


# The defaults are those of the default run (`python train.py`): the `micro` preset on
# 2 CPU cores. The built-in corpus is templated text that a small model learns fast, and
# Wyrd's init starts every block as the identity, so a high learning rate and a short
# warmup are safe. Pretraining runs past the sudden drop where the model learns to copy a
# name from its context, so it keeps one hero a story; fine-tuning takes the steps and
# rate the world facts need. The runs behind each number: docs/architecture.md §9.
PRETRAIN = TrainConfig()
FINETUNE = replace(PRETRAIN, steps=600, seq_len=384, lr=2e-3, min_lr=1e-4, warmup=20, weight_decay=0.01)
FINAL_VAL_ROWS = 192            # held-out rows of the final evaluation (all of a small split)


# ----------------------------------------------------------------------------
# Optimizer: AdamW (decoupled weight decay), as torch.optim.AdamW computes it.

def decays(name, p):
    """Weight decay on matrices only (projections, embedding): norms, biases and
    lambda_param are 1-D, h0 is [1, 1, d]."""
    return p.data.ndim == 2


class AdamW:
    def __init__(self, named_params, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8):
        self.params = list(named_params)
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps
        self.m = {n: np.zeros(p.shape, p.dtype) for n, p in self.params}   # first moment
        self.v = {n: np.zeros(p.shape, p.dtype) for n, p in self.params}   # second moment
        self.t = 0

    def step(self, lr):
        self.t += 1
        b1, b2 = self.betas
        bias1, bias2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for name, p in self.params:
            if p.grad is None:
                continue
            if not p.data.flags.c_contiguous:  # the kernel updates a flat view in place
                raise ValueError(f"AdamW: parameter {name} is not C-contiguous; update its data in place")
            decay = 1 - lr * self.weight_decay if decays(name, p) else 1.0
            f = p.data.dtype.type  # scalars in the parameters' precision: float32 stays SIMD
            adamw_kernel(p.data.reshape(-1), np.ascontiguousarray(p.grad).reshape(-1),
                         self.m[name].reshape(-1), self.v[name].reshape(-1), f(b1), f(1 - b1),
                         f(b2), f(1 - b2), f(decay), f(lr / bias1), f(math.sqrt(bias2)), f(self.eps))


@njit(parallel=True, cache=True, fastmath=FAST)
def adamw_kernel(p, g, m, v, b1, one_minus_b1, b2, one_minus_b2, decay, step, sqrt_bias2, eps):
    """One AdamW step over flat arrays in a single pass (NumPy would take ~14):
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    p = p decay - step m / (sqrt(v) / sqrt_bias2 + eps), with decay = 1 - lr wd
    and step = lr / (1 - b1^t): torch.optim.AdamW's update."""
    for i in prange(p.size):
        m[i] = b1 * m[i] + one_minus_b1 * g[i]
        v[i] = b2 * v[i] + one_minus_b2 * g[i] * g[i]
        p[i] = p[i] * decay - step * m[i] / (math.sqrt(v[i]) / sqrt_bias2 + eps)


@njit(parallel=True, cache=True, fastmath=FAST)
def sum_squares(x):
    """sum(x^2) accumulated in float64, in one pass (no float64 copy of x). Each chunk
    sums into a slot of its own, so the total does not depend on which thread ran which
    chunk: a resumed run clips exactly as the uninterrupted one."""
    partial = np.zeros(N_PARTIAL)
    n = x.size
    for part in prange(N_PARTIAL):
        total = 0.0
        for i in range(part * n // N_PARTIAL, (part + 1) * n // N_PARTIAL):
            total += np.float64(x[i]) * np.float64(x[i])
        partial[part] = total
    return partial.sum()


def lr_at(step, cfg):
    """Learning rate of optimizer step `step` (0-based): linear warmup to cfg.lr,
    then cosine decay reaching cfg.min_lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def clip_grad_norm(params, max_norm):
    """Scale all gradients so their global L2 norm is at most max_norm; -> the norm before."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = math.sqrt(sum(sum_squares(np.ascontiguousarray(g).reshape(-1)) for g in grads))
    if max_norm and norm > max_norm:
        for g in grads:
            g *= max_norm / (norm + 1e-6)
    return norm


# ----------------------------------------------------------------------------
# Training loop

class Diverged(RuntimeError):
    pass


def log_path_of(out):
    return os.path.splitext(out)[0] + ".jsonl"


def state_path_of(out):
    return os.path.splitext(out)[0] + ".train.safetensors"


def evaluate(model, rows, cfg, batches=None):
    """Mean loss over the first `batches` batches of rows, in order (the same every time)."""
    batches = cfg.eval_batches if batches is None else batches
    n = min(len(rows), batches * cfg.batch_size)
    if n == 0:
        return float("nan")
    losses, weights = [], []
    with no_grad():
        for i in range(0, n, cfg.batch_size):
            x, y, m = rows.batch(list(range(i, min(i + cfg.batch_size, n))))
            losses.append(float(model.loss(x, y, m).data))
            weights.append(float(m.sum()))
    return float(np.average(losses, weights=weights))


def bytes_per_token(tokens, tok):
    """Mean UTF-8 bytes of text per token, a special token (a document separator) as one
    byte: bits/byte = (nats/token) / ln 2 / bytes_per_token, independent of the tokenizer."""
    lengths = np.array([len(b) for b in tok.vocab])
    lengths[list(tok.special_ids.values())] = 1
    return float(lengths[np.asarray(tokens).reshape(-1)].mean()) if np.size(tokens) else float("nan")


def train_step(model, opt, rows, cfg, step):
    """One optimizer step: forward and backward over cfg.grad_accum micro-batches, clip
    the gradient, update. -> (mean loss, gradient norm before clipping)."""
    loss = 0.0
    for k in range(cfg.grad_accum):
        x, y, m = rows.batch(rows.at((step * cfg.grad_accum + k) * cfg.batch_size, cfg.batch_size, cfg.seed))
        micro = model.loss(x, y, m)
        value = float(micro.data)
        if not math.isfinite(value):
            raise Diverged(f"step {step + 1}: the loss is {value}")
        (micro * (1.0 / cfg.grad_accum)).backward()
        loss += value / cfg.grad_accum
    norm = clip_grad_norm(model.parameters(), cfg.grad_clip)
    if not math.isfinite(norm):
        raise Diverged(f"step {step + 1}: the gradient norm is {norm}")
    opt.step(lr_at(step, cfg))
    for p in model.parameters():
        p.grad = None
    return loss, norm


def train(model, tok, rows, val_rows, cfg, out, phase, data_key, meta=None, resume=False, fresh_log=True):
    """Run optimizer steps up to cfg.steps, checkpointing every cfg.ckpt_every steps, at
    the end and on Ctrl-C (the step in progress is finished first). -> summary dict."""
    if model.quantized:
        raise ValueError(f"{phase}: this model has {model.quantized} weights, for inference only; "
                         "train from the float checkpoint (checkpoint.load without quantize)")
    opt = AdamW(model.named_parameters(), weight_decay=cfg.weight_decay)
    step = load_train_state(out, opt, phase, data_key) if resume else 0
    _trim_log(log_path_of(out), phase, step, keep_other_phases=resume or not fresh_log)
    meta = dict(meta or {}, phase=phase)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    print(f"{phase}: {model.num_params():,} parameters, {len(rows):,} train rows, {len(val_rows):,} held-out rows, "
          f"steps {step}..{cfg.steps} of {tokens_per_step:,} tokens")
    if len(val_rows) == 0:
        print(f"warning: {phase}: the data are too small to hold any out; held-out losses will read nan",
              file=sys.stderr)
    first, t_start, t_first = step, time.time(), None
    summary = {}
    with _ctrl_c_finishes_the_step() as stop, open(log_path_of(out), "a", encoding="utf-8") as log:
        while step < cfg.steps and not stop:
            # the step: forward, backward, clip, AdamW
            try:
                loss, norm = train_step(model, opt, rows, cfg, step)
            except Diverged as e:
                raise Diverged(f"{phase} {e}. Stopping; the last good checkpoint is kept at {out}. "
                               "Try a lower --lr.") from None
            step += 1
            # log every step to the JSONL file, a line to the terminal every cfg.log_every
            elapsed = time.time() - t_start
            t_first = t_first or elapsed  # the first step compiles the kernels: time the rest
            tok_s = (step - first) * tokens_per_step / max(elapsed, 1e-9)
            record = {"phase": phase, "step": step, "loss": loss, "lr": lr_at(step - 1, cfg), "grad_norm": norm,
                      "tokens_per_s": round(tok_s, 1), "elapsed": round(elapsed, 2)}
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                record["val_loss"] = evaluate(model, val_rows, cfg)
            log.write(json.dumps(record) + "\n")
            log.flush()
            if step % cfg.log_every == 0 or step in (first + 1, cfg.steps) or "val_loss" in record:
                eta = (f" | ETA {_hms((cfg.steps - step) * (elapsed - t_first) / (step - first - 1))}"
                       if step > first + 1 else "")
                print(f"{phase} step {step:5d}/{cfg.steps} | loss {loss:.4f} | lr {record['lr']:.2e} | "
                      f"{tok_s:,.0f} tok/s | elapsed {_hms(elapsed)}{eta}"
                      + (f" | held-out {record['val_loss']:.4f}" if "val_loss" in record else ""), flush=True)
            # checkpoint every cfg.ckpt_every steps (the last one below)
            if step % cfg.ckpt_every == 0 and step < cfg.steps:
                save_checkpoint(out, model, tok, opt, step, cfg, phase, data_key, meta)
        if step >= cfg.steps:  # the end: losses of the final model, logged like a step
            summary = final_losses(model, tok, rows, val_rows, cfg, phase, step)
            log.write(json.dumps(dict(summary, loss=summary["train_loss"], final=True)) + "\n")
            meta[phase] = summary
            print(f"{phase} done: held-out loss {summary['val_loss']:.4f} nats/token"
                  + (f" ({summary['val_bits_per_byte']:.4f} bits/byte)" if "val_bits_per_byte" in summary else "")
                  + f", train loss {summary['train_loss']:.4f}, {_hms(time.time() - t_start)}", flush=True)
        save_checkpoint(out, model, tok, opt, step, cfg, phase, data_key, meta)
    interrupted = bool(stop) and step < cfg.steps
    if interrupted:
        print(f"stopped at step {step}; continue with the same command and --resume")
    return dict(summary, interrupted=interrupted, step=step, meta=meta)


def final_losses(model, tok, rows, val_rows, cfg, phase, step):
    """Train and held-out loss of the final model (held-out over up to FINAL_VAL_ROWS rows);
    for pretraining also bits per byte."""
    final_batches = -(-FINAL_VAL_ROWS // cfg.batch_size)
    summary = {"phase": phase, "step": step, "train_loss": evaluate(model, rows, cfg),
               "val_loss": evaluate(model, val_rows, cfg, final_batches)}
    n = min(len(val_rows), final_batches * cfg.batch_size)
    if phase == "pretrain" and n:  # the targets of the n evaluated rows (they tile the stream)
        targets = val_rows.tokens[val_rows.starts[0] + 1:val_rows.starts[n - 1] + val_rows.lengths[n - 1]]
        summary["val_bits_per_byte"] = summary["val_loss"] / math.log(2) / bytes_per_token(targets[:, 0], tok)
    return summary


@contextlib.contextmanager
def _ctrl_c_finishes_the_step():
    """Ctrl-C sets a flag (the yielded list) that the loop checks between steps; a second
    Ctrl-C stops at once. Outside the main thread Ctrl-C keeps its default meaning."""
    stop = []

    def on_sigint(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)", flush=True)
    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:
        previous = None
    try:
        yield stop
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _hms(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 \
        else f"{seconds // 60}m{seconds % 60:02d}s"


def _trim_log(path, phase, step, keep_other_phases):
    """Drop this phase's records after `step` (all of them for a fresh start, step 0), so
    a resumed run's log reads as if it had never stopped; other phases' records stay
    when asked (the default run logs both phases in one file)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if (r.get("phase") != phase and keep_other_phases) or (
                    r.get("phase") == phase and r.get("step", 0) <= step and not r.get("final")):
                keep.append(line)
    with atomic_write(path, "w") as f:
        f.write("".join(keep))


# ----------------------------------------------------------------------------
# Checkpoints. `out` holds the model and tokenizer only (a spec safetensors file
# that a PyTorch Chimera loads strictly); the sibling `.train.safetensors` holds
# what resuming needs: the AdamW moments, the step and the data order (seed and
# position: the order is a pure function of them, so they are the RNG state).
# The pair is replaced in three atomic moves: the old train state is set aside
# (`.train.prev.safetensors`), the new one written, then the new model; so a kill
# at any instant leaves a model and a train state of the same step on disk.

def prev_state_path_of(out):
    return os.path.splitext(out)[0] + ".train.prev.safetensors"


def save_checkpoint(out, model, tok, opt, step, cfg, phase, data_key, meta):
    state = {"phase": phase, "step": step, "adam_t": opt.t, "config": asdict(cfg), "data_key": data_key,
             "data_position": step * cfg.grad_accum * cfg.batch_size, "data_seed": cfg.seed}
    tensors = {f"m.{n}": m for n, m in opt.m.items()}
    tensors.update({f"v.{n}": v for n, v in opt.v.items()})
    path, prev = state_path_of(out), prev_state_path_of(out)
    if os.path.exists(path) and os.path.exists(out):
        os.replace(path, prev)  # the old pair stays whole: old model + prev
    tensorfile.write_safetensors(path, tensors, {"wyrd_train_state": json.dumps(state)})
    checkpoint.save(out, model, tok, **dict(meta, step=step, steps=cfg.steps))
    if os.path.exists(prev):
        os.remove(prev)


def read_train_state(out):
    """-> (tensors, state) of the train state whose step is the model checkpoint's. After
    a save cut short that is `.train.prev.safetensors`, which is put back in place."""
    path, prev = state_path_of(out), prev_state_path_of(out)
    if not os.path.exists(path) and not os.path.exists(prev):
        raise checkpoint.CheckpointError(f"{path}: no training state to resume from (run without --resume to start)")
    try:
        model_step = json.loads(tensorfile.read_safetensors(out, data=False)[1].get("meta", "{}")).get("step")
    except (ValueError, AttributeError, RecursionError):
        raise checkpoint.CheckpointError(f"{out}: bad __metadata__['meta']; cannot tell which step it holds") from None
    steps = {}
    for candidate in (path, prev):
        if os.path.exists(candidate):
            tensors, metadata = tensorfile.read_safetensors(candidate)
            try:
                state = json.loads(metadata["wyrd_train_state"])
            except (KeyError, ValueError, RecursionError):
                raise checkpoint.CheckpointError(f"{candidate}: not a Wyrd training state (no wyrd_train_state "
                                           "metadata)") from None
            if state.get("step") == model_step:
                if candidate == prev:
                    os.replace(prev, path)
                return tensors, state
            steps[candidate] = state.get("step")
    raise checkpoint.CheckpointError(f"{out} is at step {model_step} but " + " and ".join(
        f"{p} at step {s}" for p, s in steps.items()) + ": the pair cannot be resumed exactly")


def load_train_state(out, opt, phase, data_key):
    """Restore the optimizer moments; -> the step to continue from (the model checkpoint's)."""
    tensors, state = read_train_state(out)
    path = state_path_of(out)
    if state["phase"] != phase:
        raise checkpoint.CheckpointError(f"{path}: the saved run is a {state['phase']} run, not {phase}")
    if state["data_key"] != data_key:
        raise checkpoint.CheckpointError(f"{path}: the data or tokenizer differ from the saved run's; "
                                   "resume with the same --data (files unchanged)")
    for name, p in opt.params:
        for moments, prefix in ((opt.m, "m."), (opt.v, "v.")):
            saved = tensors.get(prefix + name)
            if saved is None or saved.shape != p.data.shape:
                raise checkpoint.CheckpointError(f"{path}: optimizer state for {name} is missing or has the wrong shape")
            moments[name][...] = saved
    opt.t = state["adam_t"]
    return state["step"]


def resume_config(out, given):
    """The saved run's TrainConfig. Flags given again must agree, except --steps (to extend a run)."""
    _, state = read_train_state(out)
    saved = TrainConfig(**state["config"])
    for name, value in given.items():
        if value is not None and name != "steps" and value != getattr(saved, name):
            raise checkpoint.CheckpointError(f"--{name.replace('_', '-')} {value} differs from the saved run's "
                                       f"{getattr(saved, name)}; a resumed run keeps its settings")
    return replace(saved, steps=given.get("steps") or saved.steps), state["phase"]


# ----------------------------------------------------------------------------
# Commands

def train_tokenizer(texts, vocab_size):
    t0 = time.time()
    tok = Tokenizer.train(texts, vocab_size)
    print(f"tokenizer: {tok.vocab_size} tokens, trained in {time.time() - t0:.1f}s")
    return tok


def load_tokenizer(path):
    """A tokenizer.json, or the tokenizer inside a Wyrd checkpoint."""
    if path.endswith(".safetensors"):
        tok = checkpoint.read_tokenizer(path)
        if tok is None:
            raise checkpoint.CheckpointError(f"{path}: this checkpoint holds no tokenizer")
        return tok
    return Tokenizer.load(path)


def fit_seq_len(cfg, config):
    """The default sequence length, cut to what the model was built for (nano: 128)."""
    return replace(cfg, seq_len=min(cfg.seq_len, config.max_seq_len))


def _check_seq_len(cfg, config):
    if cfg.seq_len > config.max_seq_len:
        raise DataError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")


def _out_dir(out):
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def pretrain(data, out, preset="micro", tokenizer=None, cfg=PRETRAIN, resume=False, tok=None):
    """Pretrain on stories packed into one stream; trains a tokenizer unless one is given."""
    out_dir = _out_dir(out)
    if resume:
        model, tok, meta = checkpoint.load(out)
    else:
        _check_seq_len(cfg, wyrd.get_config(preset))
        if tok is None and tokenizer:
            tok = load_tokenizer(tokenizer)
        elif tok is None:  # the role names too, so ChatML headers stay short when fine-tuning
            tok = train_tokenizer(itertools.chain(tokenizer_texts(data), ["system user assistant"] * 100),
                                  wyrd.get_config(preset).vocab_size)
        model = wyrd.Chimera(replace(wyrd.get_config(preset), vocab_size=tok.vocab_size), seed=cfg.seed)
        meta = {"preset": preset}
    train_tokens, val_tokens, key = load_tokens(data, tok, out_dir)
    rows = Rows.stream(train_tokens, cfg.seq_len, tok.eot_id)
    val_rows = Rows.stream(val_tokens, cfg.seq_len, tok.eot_id)
    if len(rows) == 0:
        raise DataError(f"{', '.join(data)}: {len(train_tokens)} training tokens, not enough for one "
                        f"sequence of --seq-len {cfg.seq_len}")
    result = train(model, tok, rows, val_rows, cfg, out, "pretrain", key, dict(meta, data=list(data)), resume)
    return model, tok, result


def finetune(data, init, out, cfg=FINETUNE, resume=False, lang="en", model=None, tok=None, meta=None,
             fresh_log=True):
    """Fine-tune on conversations; only assistant tokens (and their <|im_end|>) are trained."""
    out_dir = _out_dir(out)
    if resume:
        model, tok, meta = checkpoint.load(out)
    elif model is None:
        if not init:
            raise DataError("finetune needs --init CHECKPOINT (a pretrained model), or --resume")
        model, tok, meta = checkpoint.load(init)
        if tok is None:
            raise checkpoint.CheckpointError(f"{init}: this checkpoint holds no tokenizer")
    _check_seq_len(cfg, model.config)
    train_tokens, val_tokens, key = load_tokens(data, tok, out_dir, chat=True, lang=lang)
    rows = Rows.packed(train_tokens, cfg.seq_len, tok.eot_id)
    val_rows = Rows.packed(val_tokens, cfg.seq_len, tok.eot_id)
    if len(rows) == 0:
        raise DataError(f"{', '.join(data)}: no conversation with an assistant reply within --seq-len {cfg.seq_len}")
    meta = dict(meta or {}, finetune_data=list(data))
    result = train(model, tok, rows, val_rows, cfg, out, "finetune", key, meta, resume, fresh_log)
    return model, tok, result


def run_default(out="out/wyrd.safetensors", resume=False, preset="micro", pre=PRETRAIN, ft=FINETUNE,
                stories="builtin", chats="builtin", check=50):
    """Tokenizer, pretraining and fine-tuning on the built-in corpus, then a report."""
    t0 = time.time()
    pre, ft = (fit_seq_len(cfg, wyrd.get_config(preset)) for cfg in (pre, ft))
    phase = read_train_state(out)[1]["phase"] if resume else None
    if phase == "pretrain":
        pre = resume_config(out, {})[0]
    if phase != "finetune":
        tok = None
        if not resume:  # one vocabulary for stories and ChatML (role names included)
            tok = train_tokenizer(itertools.chain(tokenizer_texts([stories]), tokenizer_texts([chats], chat=True)),
                                  wyrd.get_config(preset).vocab_size)
        model, tok, result = pretrain([stories], out, preset, cfg=pre, resume=resume, tok=tok)
        if result["interrupted"]:
            return result
        meta = result["meta"]
        samples = corpus.sample_stories(model, tok, n=corpus.STORY_SAMPLES)
        meta["story_samples"], meta["names_per_story"] = samples[:3], corpus.names_per_story(samples)
        for story in meta["story_samples"]:
            print(f"--- sample story ---\n{story}")
        model, tok, result = finetune([chats], None, out, ft, model=model, tok=tok, meta=meta, fresh_log=False)
    else:
        ft = resume_config(out, {})[0]
        model, tok, result = finetune([chats], None, out, ft, resume=True)
    if result["interrupted"]:
        return result
    meta = result["meta"]
    rate, replies = corpus.reply_check(model, tok, n=check) if check else (float("nan"), [])
    facts, wrong = corpus.fact_check(model, tok) if check else (0, [])
    wall = time.time() - t0
    print(f"\n=== Wyrd: {out} written in {_hms(wall)} ===")
    for ph in ("pretrain", "finetune"):
        s = meta.get(ph, {})
        print(f"{ph:9s} final train loss {s.get('train_loss', float('nan')):.4f} | "
              f"held-out loss {s.get('val_loss', float('nan')):.4f}")
    print(f"replies ending with <|im_end|> within 200 tokens: {rate:.0%} of {check} held-out prompts")
    print(f"world facts answered exactly (greedy): {facts} of {len(corpus.FACTS)}"
          + "".join(f"\n  {q} -> {a!r}" for q, a in wrong[:5]))
    print(f"distinct character names per sampled story: {meta.get('names_per_story', float('nan')):.2f} "
          f"({corpus.STORY_SAMPLES} stories; the built-in stories have 1.6)")
    for story in meta.get("story_samples", []):
        print(f"\n--- story ---\n{story}")
    for prompt, reply in replies[:3]:
        print("\n--- chat ---\n" + "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + f"\nassistant: {reply}")
    return dict(result, reply_rate=rate, replies=replies, facts=facts, wall=wall)



# ----------------------------------------------------------------------------
# Command line

def _training_flags(p, defaults):
    for f in fields(TrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=None, help=f"{f.metadata['help']} (default: {getattr(defaults, f.name)})")


def _run_flags(p):
    p.add_argument("--resume", action="store_true", help="continue the run stopped at --out (default: off)")
    p.add_argument("--overwrite", action="store_true", help="start over, replacing the run at --out (default: off)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train Wyrd. With no command: the whole default run on the built-in corpus "
                    "(tokenizer, pretrain, fine-tune) -> out/wyrd.safetensors.",
        epilog="Run `python train.py COMMAND --help` for the flags of a command. The data formats "
               "are listed by `python data.py --help`.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("all", help="the default run (also: no command)",
                       description="Tokenizer, pretraining and fine-tuning on the built-in corpus, then a report "
                                   "(held-out losses, samples, reply check).")
    p.add_argument("--out", default="out/wyrd.safetensors", help="checkpoint file (default: out/wyrd.safetensors)")
    p.add_argument("--preset", default="micro", choices=list(wyrd.PRESETS), help="model size (default: micro)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and of both phases' data order "
                                                         "(default: 0)")
    _run_flags(p)
    p.set_defaults(func=_cmd_all)

    p = sub.add_parser("pretrain", help="pretrain on stories",
                       description="Pretrain on stories (documents joined by <|endoftext|>).")
    p.add_argument("--data", nargs="+", default=["builtin"],
                   help="story files (.txt, .json, .tar.gz, each optionally .gz) or builtin[:N] (default: builtin)")
    p.add_argument("--preset", default="micro", choices=list(wyrd.PRESETS), help="model size (default: micro)")
    p.add_argument("--tokenizer", help="tokenizer.json or a checkpoint to take it from "
                                       "(default: train one on the data, with the preset's vocabulary size)")
    p.add_argument("--out", default="out/pretrain.safetensors", help="checkpoint file; the metrics log is "
                   "beside it with the same stem and .jsonl (default: out/pretrain.safetensors)")
    _run_flags(p)
    _training_flags(p, PRETRAIN)
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune on conversations",
                       description="Fine-tune on ChatML conversations; only assistant tokens are trained.")
    p.add_argument("--data", nargs="+", default=["builtin"],
                   help="chat files (chat JSONL, OASST messages or trees JSONL, each optionally .gz) "
                        "or builtin[:N] (default: builtin)")
    p.add_argument("--init", help="pretrained checkpoint to start from (required unless --resume)")
    p.add_argument("--lang", default="en", help="OASST language to keep, 'all' for every one (default: en)")
    p.add_argument("--out", default="out/wyrd.safetensors", help="checkpoint file; the metrics log is "
                   "beside it with the same stem and .jsonl (default: out/wyrd.safetensors)")
    _run_flags(p)
    _training_flags(p, FINETUNE)
    p.set_defaults(func=_cmd_finetune)

    return parser


def _fresh(args):
    """A new run must not destroy one the user made: without --resume, refuse to
    replace an existing run at --out unless --overwrite says so."""
    if args.resume or args.overwrite:
        return
    found = [p for p in (args.out, state_path_of(args.out), log_path_of(args.out)) if os.path.exists(p)]
    if found:
        raise DataError(f"{found[0]} exists: continue that run with --resume, start over with --overwrite, "
                        "or choose another --out")


def _given(args):
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig)}


# the smallest value each flag takes (0 means "off" where it is allowed; see --help)
FLAG_MIN = {"steps": 1, "batch_size": 1, "grad_accum": 1, "seq_len": 1, "warmup": 0, "eval_every": 0,
            "eval_batches": 1, "ckpt_every": 1, "log_every": 1, "seed": 0,
            "lr": 0, "min_lr": 0, "weight_decay": 0, "grad_clip": 0}


def check_config(cfg):
    """Every training flag in range, before anything is built or written."""
    for name, low in FLAG_MIN.items():
        value = getattr(cfg, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"{flag} must be a finite number, got {value}")
        if value < low or (name == "lr" and value == 0):
            raise DataError(f"{flag} must be {'> 0' if name == 'lr' else f'>= {low}'}, got {value}")
    return cfg


def _config(args, defaults, phase, model_config=None):
    """The TrainConfig of a command: the saved run's when resuming, else the defaults with
    the flags given; an unset --seq-len is at most the model's max_seq_len."""
    given = _given(args)
    if args.resume:
        cfg, saved_phase = resume_config(args.out, given)
        if saved_phase != phase:
            raise checkpoint.CheckpointError(f"{args.out}: the saved run is a {saved_phase} run, not {phase}")
        return check_config(cfg)
    cfg = replace(defaults, **{k: v for k, v in given.items() if v is not None})
    if given["seq_len"] is None and model_config is not None:
        cfg = fit_seq_len(cfg, model_config)
    return check_config(cfg)


def _cmd_all(args):
    if args.seed < 0:
        raise DataError(f"--seed must be >= 0, got {args.seed}")
    _fresh(args)
    run_default(args.out, args.resume, args.preset,
                replace(PRETRAIN, seed=args.seed), replace(FINETUNE, seed=args.seed))


def _cmd_pretrain(args):
    cfg = _config(args, PRETRAIN, "pretrain", wyrd.get_config(args.preset))
    _fresh(args)
    pretrain(args.data, args.out, args.preset, args.tokenizer, cfg, args.resume)


def _cmd_finetune(args):
    cfg = _config(args, FINETUNE, "finetune", checkpoint.read_config(args.init) if args.init else None)
    _fresh(args)
    finetune(args.data, args.init, args.out, cfg, args.resume, None if args.lang == "all" else args.lang)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("convert", "download"):
        print(f"error: {argv[0]} is a data command: python data.py {' '.join(argv)}", file=sys.stderr)
        return 2
    if not argv or argv[0] not in ("all", "pretrain", "finetune", "-h", "--help"):
        argv = ["all"] + argv
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DataError, TokenizerError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, a missing or read-only folder: the last checkpoint is kept
        print(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the training loop (which saves first), or a second Ctrl-C
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
