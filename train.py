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
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the libraries load (~0.5 s): one line, not a traceback
    def _interrupted_while_loading(signum, frame):
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130)
    signal.signal(signal.SIGINT, _interrupted_while_loading)

import wyrd

import argparse
import contextlib
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
from numba import njit, prange

import checkpoint
import corpus
import tensorfile
from autograd import FAST, LANES, N_PARTIAL, no_grad
from data import DataError, Rows, load_tokens, tokenizer_texts
from runtime import atomic_write, remove_stale_temps
from tokenizer import EOT, SPECIAL_TOKENS, Tokenizer, TokenizerError

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
    sums in LANES parts into a slot of its own, in an order fixed by the code, not by
    which thread ran it: a resumed run clips exactly as the uninterrupted one."""
    partial = np.zeros(N_PARTIAL)
    n = x.size
    for part in prange(N_PARTIAL):
        lanes = np.zeros(LANES)
        lo, hi = part * n // N_PARTIAL, (part + 1) * n // N_PARTIAL
        m = hi - (hi - lo) % LANES
        for i0 in range(lo, m, LANES):
            for l in range(LANES):
                lanes[l] += np.float64(x[i0 + l]) * np.float64(x[i0 + l])
        total = lanes[0]
        for l in range(1, LANES):
            total += lanes[l]
        for i in range(m, hi):
            total += np.float64(x[i]) * np.float64(x[i])
        partial[part] = total
    total = partial[0]
    for part in range(1, N_PARTIAL):  # in order: partial.sum() would be split over the threads
        total += partial[part]
    return total


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


PHASES = ("pretrain", "finetune")


def log_path_of(out):
    return os.path.splitext(out)[0] + ".jsonl"


def state_path_of(out):
    return os.path.splitext(out)[0] + ".train.safetensors"


def run_files(out):
    """The files a run at `out` writes -> what each holds: the model checkpoint, the training
    state, the state set aside during a save (below) and the metrics log."""
    return {out: "model", state_path_of(out): "state", prev_state_path_of(out): "state", log_path_of(out): "log"}


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
    for path in run_files(out):  # what saves cut short by a kill left behind (a medium state: 1.8 GB)
        remove_stale_temps(path)
    if not resume and fresh_log:  # the replaced run goes first: a kill before the first save leaves no mix
        for path in (out, state_path_of(out), prev_state_path_of(out)):
            if os.path.exists(path):
                os.remove(path)
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
                raise Diverged(f"{phase} {e}. Stopping; {_left_after_divergence(out)}") from None
            step += 1
            # log every step to the JSONL file, a line to the terminal every cfg.log_every
            elapsed = time.time() - t_start
            t_first = t_first or elapsed  # the first step compiles the kernels: time the rest
            tok_s = (step - first) * tokens_per_step / max(elapsed, 1e-9)
            record = {"phase": phase, "step": step, "loss": loss, "lr": lr_at(step - 1, cfg), "grad_norm": norm,
                      "tokens_per_s": round(tok_s, 1), "elapsed": round(elapsed, 2)}
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                record["val_loss"] = evaluate(model, val_rows, cfg)
            _append(log, record)
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
            _append(log, dict(summary, loss=summary["train_loss"], final=True))
            meta[phase] = summary
            print(f"{phase} done: held-out loss {summary['val_loss']:.4f} nats/token"
                  + (f" ({summary['val_bits_per_byte']:.4f} bits/byte)" if "val_bits_per_byte" in summary else "")
                  + f", train loss {summary['train_loss']:.4f}, {_hms(time.time() - t_start)}", flush=True)
        save_checkpoint(out, model, tok, opt, step, cfg, phase, data_key, meta)
    interrupted = bool(stop) and step < cfg.steps
    if interrupted:
        print(f"stopped at step {step}; continue with the same command and --resume")
    return dict(summary, interrupted=interrupted, step=step, meta=meta)


def _append(log, record):
    """One record to the open log, flushed; a failed write (a full disk) names the log."""
    try:
        log.write(json.dumps(record) + "\n")
        log.flush()
    except OSError as e:
        with contextlib.suppress(OSError):  # closed now: the unwritten rest would fail again, unnamed, at exit
            log.close()
        raise type(e)(e.errno, e.strerror, log.name) from None


def _left_after_divergence(out):
    """What a diverged run leaves, and a command that starts again."""
    try:
        meta = json.loads(tensorfile.read_safetensors(out, data=False)[1]["meta"])
        kept = f"{meta['phase']} step {meta['step']}"
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # no checkpoint (ValueError: CheckpointError)
        return "no checkpoint was saved. Start again (without --resume) with a lower --lr."
    return (f"the last good checkpoint, {kept}, is kept at {out}. Resuming would repeat the same steps: "
            "start over with a lower --lr and --overwrite, or with another --out.")


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


def log_record(line):
    """The record of one line of a metrics log (bytes), or None for a line that is not one
    (cut short by a kill, or edited)."""
    try:
        r = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return r if isinstance(r, dict) and r.get("phase") in PHASES and type(r.get("step")) is int else None


def _trim_log(path, phase, step, keep_other_phases):
    """Drop this phase's records after `step` (all of them for a fresh start, step 0), so
    a resumed run's log reads as if it had never stopped; other phases' records stay
    when asked (the default run logs both phases in one file). Lines that are not
    records are dropped, with a note."""
    if not os.path.exists(path):
        return
    keep, bad = [], []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            r = log_record(line)
            if r is None:
                if line.strip():
                    bad.append(number)
            elif (r["phase"] != phase and keep_other_phases) or (
                    r["phase"] == phase and r["step"] <= step and not r.get("final")):
                keep.append(line.decode("utf-8").rstrip("\r\n") + "\n")
    if bad:
        print(f"note: {path}: dropped {len(bad)} line(s) that are not log records, line {bad[0]} first",
              file=sys.stderr)
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
    has_state = os.path.exists(path) or os.path.exists(prev)
    if not os.path.exists(out) and has_state:
        raise checkpoint.CheckpointError(f"{out}: no checkpoint to resume from (the run stopped before saving its "
                                   "first); start it again without --resume")
    if not os.path.exists(out):
        raise checkpoint.CheckpointError(f"{path}: no training state to resume from (run without --resume to start)")
    if not has_state:
        raise checkpoint.CheckpointError(f"{path}: no training state to resume from, so {out} cannot be continued; "
                                   "start over with --overwrite, or choose another --out")
    metadata = tensorfile.read_safetensors(out, data=False)[1]
    try:
        model_step = json.loads(metadata.get("meta", "{}")).get("step")
    except (ValueError, AttributeError, RecursionError):
        raise checkpoint.CheckpointError(f"{out}: bad __metadata__['meta']; cannot tell which step it holds") from None
    steps = {}
    for candidate in (path, prev):
        if os.path.exists(candidate):
            tensors, metadata = tensorfile.read_safetensors(candidate)
            state = _train_state_of(candidate, metadata)
            if state["step"] == model_step:
                if candidate == prev:
                    os.replace(prev, path)
                return tensors, state
            steps[candidate] = state["step"]
    raise checkpoint.CheckpointError(f"{out} is at step {model_step!r} but " + " and ".join(
        f"{p} at step {s}" for p, s in steps.items()) + ": the pair cannot be resumed exactly; start over with "
        "--overwrite, or choose another --out")


def _train_state_of(path, metadata):
    """The wyrd_train_state of a state file, checked, so that a file edited by hand or
    written by another version of train.py is one line naming what was expected."""
    try:
        state = json.loads(metadata["wyrd_train_state"])
    except (KeyError, ValueError, RecursionError):
        raise checkpoint.CheckpointError(f"{path}: not a Wyrd training state (no wyrd_train_state metadata)") from None

    def bad(problem):
        return checkpoint.CheckpointError(f"{path}: wyrd_train_state {problem}; expected what train.py writes: an "
                                    "object of phase, step, adam_t, data_key and config (every training setting)")
    if not isinstance(state, dict):
        raise bad(f"is a JSON {type(state).__name__}")
    for key, kind in (("phase", str), ("step", int), ("adam_t", int), ("data_key", str), ("config", dict)):
        if key not in state:
            raise bad(f"has no {key!r}")
        if type(state[key]) is not kind or (kind is int and state[key] < 0):
            raise bad(f"has {key} {state[key]!r:.40}")
    if state["phase"] not in PHASES:
        raise bad(f"has phase {state['phase']!r:.40}")
    config, names = state["config"], [f.name for f in fields(TrainConfig)]
    for name in config:
        if name not in names:
            raise bad(f"config has unknown setting {name!r:.40}")
    for name in names:
        if name not in config:
            raise bad(f"config has no {name!r}")
        want = type(getattr(PRETRAIN, name))  # a float setting may be saved as an int (lr 1)
        if not (type(config[name]) is want or (want is float and type(config[name]) is int)):
            raise bad(f"config has {name} {config[name]!r:.40}, not a{'n' if want is int else ''} {want.__name__}")
    return state


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


def check_specials(tok, source, needed):
    """Stories end in <|endoftext|>; conversations also need ChatML's two tokens."""
    missing = [s for s in needed if s not in tok.special_ids]
    if missing:
        raise TokenizerError(f"{source}: the tokenizer has no {' or '.join(missing)} special token; Wyrd "
                             f"trains with {', '.join(SPECIAL_TOKENS)} (leave out --tokenizer to train one)")


def fit_seq_len(cfg, config):
    """The default sequence length, cut to what the model was built for (nano: 128)."""
    return replace(cfg, seq_len=min(cfg.seq_len, config.max_seq_len))


def _check_seq_len(cfg, config):
    if cfg.seq_len > config.max_seq_len:
        raise DataError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")


def available_memory():
    """Bytes of memory a new program can take without swapping (Linux's MemAvailable; the
    free pages elsewhere), or None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this system (macOS, Windows)
        return None


def memory_needed(cfg, config):
    """Bytes a training run takes, roughly: four float32 copies of the parameters (weights,
    gradients, AdamW's two moments), the activations one micro-batch keeps for backward,
    and ~0.2 GB for Python, NumPy and the compiled kernels. The activations were measured
    (peak RSS of nano, micro and tiny runs) at ~6 floats per token per layer for each of
    d_model and the FFN width, plus ~2 per token for each logit; attention keeps no score
    matrix. The vocabulary is the config's, an upper bound before a tokenizer is trained."""
    d, ffn, layers, vocab = config.d_model, config.ffn_hidden, config.n_layers, config.vocab_size
    params = vocab * d + layers * (3 * d * ffn + 4 * d * d)  # embedding, FFNs, mixing (to a few %)
    activations = cfg.batch_size * cfg.seq_len * (6 * layers * (d + ffn) + 2 * vocab)
    return 4 * (4 * params + activations) + 0.2e9


def check_memory(cfg, config):
    """Refuse, before anything is built, a run that cannot fit in the memory available."""
    need, have = memory_needed(cfg, config), available_memory()
    if have is not None and need > have:
        raise DataError(f"--batch-size {cfg.batch_size}, --seq-len {cfg.seq_len}: this model "
                        f"({config.d_model} wide, {config.n_layers} layers) needs about {need / 1e9:,.1f} GB "
                        f"of memory to train and {have / 1e9:.1f} GB is available; use a smaller --batch-size "
                        "or --seq-len (with --grad-accum for the same tokens per step) or a smaller --preset")


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
            check_specials(tok, tokenizer, [EOT])
            preset_config = wyrd.get_config(preset)
            if tok.vocab_size > preset_config.vocab_size:  # the model takes the tokenizer's vocabulary
                config = replace(preset_config, vocab_size=tok.vocab_size)
                check_memory(cfg, config)
                print(f"note: {tokenizer}: its {tok.vocab_size:,} tokens become {preset}'s vocabulary (the preset "
                      f"has {preset_config.vocab_size:,}); training needs about "
                      f"{memory_needed(cfg, config) / 1e9:,.1f} GB", file=sys.stderr)
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
        check_specials(tok, init, SPECIAL_TOKENS)
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
        meta["objects_per_story"] = corpus.objects_per_story(samples)
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
    skills = (corpus.skill_check(model, tok, n=min(check, 40)) if check
              else dict.fromkeys(("topic", "recall", "declines"), float("nan")))
    wall = time.time() - t0
    print(f"\n=== Wyrd: {out} written in {_hms(wall)} ===")
    for ph in ("pretrain", "finetune"):
        s = meta.get(ph, {})
        print(f"{ph:9s} final train loss {s.get('train_loss', float('nan')):.4f} | "
              f"held-out loss {s.get('val_loss', float('nan')):.4f}")
    print(f"replies ending with <|im_end|> within 200 tokens: {rate:.0%} of {check} held-out prompts")
    print(f"world facts answered exactly (greedy): {facts} of {len(corpus.FACTS)}"
          + "".join(f"\n  {q} -> {a!r}" for q, a in wrong[:5]))
    print(f"stories about what was asked (greedy): {skills['topic']:.0%}; questions about its own story answered "
          f"exactly: {skills['recall']:.0%}; questions outside its world declined: {skills['declines']:.0%} "
          f"({len(corpus.OUTSIDE)})")
    print(f"per sampled story: {meta.get('names_per_story', float('nan')):.2f} distinct character names, "
          f"{meta.get('objects_per_story', float('nan')):.2f} objects ({corpus.STORY_SAMPLES} stories; "
          f"the built-in stories have 1.6 and 0.6)")
    for story in meta.get("story_samples", []):
        print(f"\n--- story ---\n{story}")
    for prompt, reply in replies[:3]:
        print("\n--- chat ---\n" + "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + f"\nassistant: {reply}")
    return dict(result, reply_rate=rate, replies=replies, facts=facts, wall=wall, **skills)



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
    p.add_argument("--preset", choices=list(wyrd.PRESETS), help="model size (default: micro)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and of both phases' data order "
                                                         "(default: 0)")
    _run_flags(p)
    p.set_defaults(func=_cmd_all)

    p = sub.add_parser("pretrain", help="pretrain on stories",
                       description="Pretrain on stories (documents joined by <|endoftext|>).")
    p.add_argument("--data", nargs="+", default=["builtin"],
                   help="story files (.txt, .json, .tar.gz, each optionally .gz) or builtin[:N] (default: builtin)")
    p.add_argument("--preset", choices=list(wyrd.PRESETS), help="model size (default: micro)")
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


def check_out(args):
    """--out and the files named after it, before anything is built or written: a checkpoint
    file name in a folder that exists or can be made, none of its files a file the run reads."""
    out, name = args.out, os.path.basename(args.out)
    if args.resume and args.overwrite:
        raise DataError("--resume continues the run at --out and --overwrite starts it over; pass one of them")
    if getattr(args, "preset", None) and args.resume and os.path.isfile(out):
        saved = checkpoint.read_meta(out).get("preset")
        if saved and saved != args.preset:
            raise DataError(f"--preset {args.preset} differs from the saved run's {saved}; a resumed run keeps "
                            "its model (leave out --preset)")
    if hasattr(args, "preset") and args.preset is None:
        args.preset = "micro"
    if not name.endswith(".safetensors") or name == ".safetensors":  # else the log could be `out` itself
        raise DataError(f"--out {out!r}: expected a checkpoint file name ending in .safetensors (the metrics "
                        "log and training state are named after it)")
    if name.endswith((".train.safetensors", ".train.prev.safetensors")):
        raise DataError(f"--out {out}: that is the name of another run's training state; choose another --out")
    if os.path.isdir(out):
        raise DataError(f"--out {out}: is a folder; expected a checkpoint file such as "
                        f"{os.path.join(out, 'wyrd.safetensors')}")
    folder = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(folder):  # the folders still to be made: check the nearest that exists
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise DataError(f"--out {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"--out {out}: cannot write in the folder {folder}")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not known here (Windows): the usual limit
        name_max = 255
    longest = max(len(os.path.basename(p).encode()) for p in run_files(out)) + len(".tmp4194304")
    if longest > name_max:  # else the first checkpoint fails, after the training it should keep
        raise DataError(f"--out {out}: the name is too long: its training state's temporary file would have "
                        f"{longest} bytes, over the {name_max} a file name may have here")
    sources = [("--data", d) for d in getattr(args, "data", None) or []]
    sources += [(flag, getattr(args, flag[2:], None)) for flag in ("--init", "--tokenizer")]
    for path, kind in run_files(out).items():
        for flag, source in sources:
            if source and _same_file(path, source):
                raise DataError(f"--out {out}: its {FILE_KINDS[kind]} {path} would replace the {flag} file; "
                                "choose another --out")


FILE_KINDS = {"model": "checkpoint", "state": "training state", "log": "metrics log"}


def _same_file(a, b):
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:  # a hard link
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def is_run_file(path, kind):
    """Whether `path` holds what a training run writes as `kind`, so that replacing it loses
    nothing the user made: a model with Wyrd's metadata and a training step, a training
    state, or a log whose first lines are mostly log records (one may be cut short or edited).
    A run writes regular files only: a link, folder, pipe or device is the user's."""
    if os.path.islink(path) or not os.path.isfile(path):  # also: reading a pipe would wait forever
        return False
    if kind == "log":
        records = others = 0
        try:
            with open(path, "rb") as f:
                for _ in range(100):
                    line = f.readline(1 << 16)  # a long line is not a record: no need to read it all
                    if not line:
                        break
                    if log_record(line):
                        records += 1
                    elif line.strip():
                        others += 1
        except OSError:  # unreadable
            return False
        return records >= others
    try:
        metadata = tensorfile.read_safetensors(path, data=False)[1]
    except (OSError, checkpoint.CheckpointError):
        return False
    if kind == "state":
        return "wyrd_train_state" in metadata
    try:
        meta = json.loads(metadata.get("meta", "{}"))
    except (ValueError, RecursionError):
        return False
    return metadata.get("format") == "wyrd" and isinstance(meta, dict) and "step" in meta


def claim_run_files(args):
    """A run never destroys what the user made. Without --resume it replaces the run at --out
    only on --overwrite, or when that run saved no checkpoint (nothing there to resume; the
    files go when training starts); a file that is not a run's own is never replaced."""
    found = {p: kind for p, kind in run_files(args.out).items() if os.path.lexists(p)}
    for path, kind in found.items():
        # resuming reads the checkpoint and state, whose readers say what else is wrong; it rewrites the log
        ours = os.path.isfile(path) if args.resume and kind != "log" else is_run_file(path, kind)
        if not ours:
            raise DataError(f"{path}: exists and is not a Wyrd {FILE_KINDS[kind]}; a run replaces only its own "
                            "files: move it away, or choose another --out")
    if args.resume or args.overwrite or not found:
        return
    if args.out not in found:
        print(f"note: starting over, replacing what a run that saved no checkpoint left: {', '.join(found)}",
              file=sys.stderr)
    elif not (os.path.exists(state_path_of(args.out)) or os.path.exists(prev_state_path_of(args.out))):
        raise DataError(f"{args.out} exists, without a training state to resume it: start over with --overwrite, "
                        "or choose another --out")
    else:
        raise DataError(f"{args.out} exists: continue that run with --resume, start over with --overwrite, "
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
    check_out(args)
    claim_run_files(args)
    config = wyrd.get_config(args.preset)
    for cfg in (PRETRAIN, FINETUNE):
        check_memory(fit_seq_len(cfg, config), config)
    run_default(args.out, args.resume, args.preset,
                replace(PRETRAIN, seed=args.seed), replace(FINETUNE, seed=args.seed))


def _cmd_pretrain(args):
    check_out(args)
    claim_run_files(args)
    cfg = _config(args, PRETRAIN, "pretrain", wyrd.get_config(args.preset))
    config = checkpoint.read_config(args.out) if args.resume else wyrd.get_config(args.preset)
    _check_seq_len(cfg, config)
    check_memory(cfg, config)
    pretrain(args.data, args.out, args.preset, args.tokenizer, cfg, args.resume)


def _cmd_finetune(args):
    check_out(args)
    claim_run_files(args)
    config = checkpoint.read_config(args.init) if args.init and not args.resume else None
    cfg = _config(args, FINETUNE, "finetune", config)
    config = checkpoint.read_config(args.out) if args.resume else config
    if config is not None:  # else finetune() says --init is missing
        _check_seq_len(cfg, config)
        check_memory(cfg, config)
    finetune(args.data, args.init, args.out, cfg, args.resume, None if args.lang == "all" else args.lang)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("convert", "download"):
        print(f"error: {argv[0]} is a data command: python data.py {' '.join(argv)}", file=sys.stderr)
        return 2
    if not argv or argv[0] not in ("all", "pretrain", "finetune", "-h", "--help"):
        argv = ["all"] + argv
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except (DataError, TokenizerError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, a missing or read-only folder: the last checkpoint is kept
        print(f"error: {str(e.filename) + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except MemoryError:  # more than check_memory estimated, or memory other programs took meanwhile
        print("error: out of memory: a smaller --batch-size or --seq-len (with --grad-accum for the same "
              "tokens per step) or a smaller --preset needs less", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the training loop (which saves first), or a second Ctrl-C
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C is main()'s to handle again
    sys.exit(main())
