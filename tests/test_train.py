"""Training: AdamW, the schedule, clipping, checkpoints, exact resume, the CLI and short real runs (nano)."""
import wyrd
import tensorfile
import checkpoint

import json
import math
import os
import signal
from dataclasses import fields, replace

import numpy as np
import pytest

import corpus
import data
import train
from autograd import Tensor
from tokenizer import Tokenizer

# a few steps of everything: evaluation, checkpoints, accumulation
TINY = train.TrainConfig(steps=6, batch_size=2, grad_accum=2, seq_len=32, lr=3e-3, min_lr=3e-4, warmup=2,
                         eval_every=3, eval_batches=2, ckpt_every=2, log_every=1)


@pytest.fixture(scope="module")
def tok():
    texts = corpus.builtin_stories(300) + [f"{m['role']}\n{m['content']}" for c in corpus.builtin_chats(200) for m in c]
    return Tokenizer.train(texts, 400)


def log_of(out):
    with open(train.log_path_of(str(out))) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return [(r["phase"], r["step"], r["loss"], r.get("val_loss")) for r in log_of(out)]


# ---------------------------------------------------------------------------- optimizer

def test_adamw_matches_a_hand_computed_step():
    w = Tensor(np.array([[1.0]], dtype=np.float32), requires_grad=True)   # a matrix: decayed
    b = Tensor(np.array([1.0], dtype=np.float32), requires_grad=True)     # a vector: not decayed
    opt = train.AdamW([("w", w), ("b", b)], weight_decay=0.5)
    # step 1: m = 0.2, v = 0.2, m/(1-0.9) = 2, sqrt(v/(1-0.95)) = 2 -> the update is lr * 1
    # step 2: m = 0.08, v = 0.24, (0.08/0.19) / sqrt(0.24/0.0975) = 0.268369448
    expected_w = [0.95 - 0.1, 0.85 * 0.95 - 0.1 * 0.268369448]
    expected_b = [1.0 - 0.1, 0.9 - 0.1 * 0.268369448]
    for t, g in enumerate((2.0, -1.0)):
        w.grad = np.full((1, 1), g, dtype=np.float32)
        b.grad = np.full(1, g, dtype=np.float32)
        opt.step(lr=0.1)
        assert w.data[0, 0] == pytest.approx(expected_w[t], abs=1e-6)
        assert b.data[0] == pytest.approx(expected_b[t], abs=1e-6)
    assert opt.t == 2 and opt.m["w"][0, 0] == pytest.approx(0.08) and opt.v["b"][0] == pytest.approx(0.24)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_kernel_matches_the_numpy_formula(dtype):
    rng = np.random.default_rng(0)
    p, g, m = (rng.standard_normal(1000).astype(dtype) for _ in range(3))
    v = rng.uniform(0, 2, 1000).astype(dtype)
    b1, b2, lr, wd, eps, t = 0.9, 0.95, 3e-3, 0.1, 1e-8, 7
    bias1, bias2 = 1 - b1 ** t, 1 - b2 ** t
    m_ref = b1 * m + (1 - b1) * g                                  # the plain NumPy AdamW step
    v_ref = b2 * v + (1 - b2) * g * g
    p_ref = p * (1 - lr * wd) - (lr / bias1) * m_ref / (np.sqrt(v_ref) / np.sqrt(bias2) + eps)
    f = np.dtype(dtype).type
    train.adamw_kernel(p, g, m, v, f(b1), f(1 - b1), f(b2), f(1 - b2), f(1 - lr * wd), f(lr / bias1),
                       f(np.sqrt(bias2)), f(eps))
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(m, m_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(v, v_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(p, p_ref, rtol=tol, atol=tol)


def test_sum_squares_does_not_depend_on_the_threads():
    """The gradient norm must be bit-identical however the chunks fall on threads, or a
    resumed run clips differently from the uninterrupted one."""
    import numba
    x = np.random.default_rng(3).standard_normal(100_003).astype(np.float32) * 1e3
    before = numba.get_num_threads()
    try:
        totals = set()
        for n in range(1, before + 1):
            numba.set_num_threads(n)
            totals.add(train.sum_squares(x))
    finally:
        numba.set_num_threads(before)
    assert len(totals) == 1


def test_sum_squares_accumulates_in_float64():
    x = np.random.default_rng(1).standard_normal(100_003).astype(np.float32) * 1e3
    assert train.sum_squares(x) == pytest.approx(float(np.sum(x.astype(np.float64) ** 2)), rel=1e-12)
    assert train.sum_squares(np.zeros(0, np.float32)) == 0.0


def test_no_weight_decay_on_norms_biases_lambda_and_h0():
    model = wyrd.Chimera(wyrd.get_config("nano"))
    decayed = {n for n, p in model.named_parameters() if train.decays(n, p)}
    assert "embed_tokens.weight" in decayed and "layers.0.ffn.w1.weight" in decayed
    assert "layers.2.temporal_mix.q_proj.weight" in decayed
    for n, p in model.named_parameters():
        if n.endswith(("norm.weight", "norm1.weight", "norm2.weight", ".bias", "lambda_param", "h0")):
            assert n not in decayed, n
    assert len(decayed) == sum(p.data.ndim == 2 for _, p in model.named_parameters())


def test_schedule_warms_up_linearly_then_follows_the_cosine():
    cfg = train.TrainConfig(steps=23, warmup=2, lr=1.0, min_lr=0.1)
    assert [train.lr_at(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert train.lr_at(2, cfg) == 1.0                       # the cosine starts at the peak
    assert train.lr_at(12, cfg) == pytest.approx(0.55)      # halfway: (peak + floor) / 2
    assert train.lr_at(22, cfg) == pytest.approx(0.1)       # the last step reaches the floor
    lrs = [train.lr_at(s, cfg) for s in range(2, 23)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_clip_grad_norm_scales_to_the_global_norm():
    a = Tensor(np.zeros(2, dtype=np.float32), requires_grad=True)
    b = Tensor(np.zeros((1, 1), dtype=np.float32), requires_grad=True)
    a.grad, b.grad = np.array([3.0, 0.0], dtype=np.float32), np.array([[4.0]], dtype=np.float32)
    assert train.clip_grad_norm([a, b], 10.0) == pytest.approx(5.0)
    assert a.grad.tolist() == [3.0, 0.0]                     # under the limit: untouched
    assert train.clip_grad_norm([a, b], 1.0) == pytest.approx(5.0)
    assert a.grad == pytest.approx([0.6, 0.0], abs=1e-6) and b.grad[0, 0] == pytest.approx(0.8, abs=1e-6)


# ---------------------------------------------------------------------------- runs

def test_pretrain_then_finetune_lowers_the_loss_and_writes_clean_checkpoints(tmp_path, tok):
    cfg = replace(TINY, steps=30, batch_size=8, grad_accum=1, seq_len=64, ckpt_every=100, eval_every=10)
    out = str(tmp_path / "p.safetensors")
    model, _, result = train.pretrain(["builtin:300"], out, "nano", cfg=cfg, tok=tok)
    log = log_of(out)
    assert [r["step"] for r in log if not r.get("final")] == list(range(1, 31))
    first, last = np.mean([r["loss"] for r in log[:3]]), np.mean([r["loss"] for r in log[-4:-1]])
    assert first > math.log(tok.vocab_size) - 0.5 and last < first - 1.0, (first, last)
    assert result["val_loss"] < first - 1.0 and log[-1]["final"]
    assert 0.2 < result["val_loss"] / result["val_bits_per_byte"] / math.log(2) < 8   # bytes per token
    assert [r["step"] for r in log if "val_loss" in r] == [10, 20, 30]
    # the model file is a pure spec checkpoint; the optimizer lives beside it
    tensors, metadata = tensorfile.read_safetensors(out)
    assert set(tensors) == {n for n, _ in model.named_parameters()}
    assert json.loads(metadata["meta"])["step"] == 30 and "tokenizer" in metadata
    moments, _ = tensorfile.read_safetensors(train.state_path_of(out))
    assert set(moments) == {p + n for n in tensors for p in ("m.", "v.")}

    ft_out = str(tmp_path / "chat.safetensors")
    ft = replace(cfg, steps=12, seq_len=128, lr=1e-3, eval_every=0)
    model2, tok2, r2 = train.finetune(["builtin:120"], out, ft_out, ft)
    flog = [r for r in log_of(ft_out) if not r.get("final")]
    assert [r["phase"] for r in flog] == ["finetune"] * 12   # its own log, not the pretrain one
    assert np.mean([r["loss"] for r in flog[-3:]]) < np.mean([r["loss"] for r in flog[:3]])
    loaded, loaded_tok, meta = checkpoint.load(ft_out)
    assert loaded_tok.to_json() == tok.to_json() and meta["pretrain"]["val_loss"] == result["val_loss"]
    assert meta["finetune"]["val_loss"] == r2["val_loss"] and math.isfinite(r2["val_loss"])
    for n, p in loaded.named_parameters():
        assert np.array_equal(p.data, dict(model2.named_parameters())[n].data)



def test_bits_per_byte_counts_text_bytes_and_one_per_separator(tok):
    text = "Once upon a time, a cat named T\u00f6m sat."
    ids = tok.encode(text) + [tok.eot_id] + tok.encode(text)
    assert train.bytes_per_token(ids, tok) == (2 * len(text.encode("utf-8")) + 1) / len(ids)

def test_resume_after_a_kill_is_bit_identical(tmp_path, tok, monkeypatch):
    ref = str(tmp_path / "ref.safetensors")
    ref_model = train.pretrain(["builtin:150"], ref, "nano", cfg=TINY, tok=tok)[0]

    out = str(tmp_path / "run.safetensors")
    calls = []
    original = train.AdamW.step

    def killed_at_step_5(self, lr):
        calls.append(lr)
        if len(calls) == 5:
            raise RuntimeError("killed")
        original(self, lr)
    monkeypatch.setattr(train.AdamW, "step", killed_at_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        train.pretrain(["builtin:150"], out, "nano", cfg=TINY, tok=tok)
    monkeypatch.undo()
    assert json.loads(tensorfile.read_safetensors(out)[1]["meta"])["step"] == 4   # the last checkpoint
    assert [r["step"] for r in log_of(out)] == [1, 2, 3, 4]

    model, _, result = train.pretrain(["builtin:150"], out, "nano", cfg=TINY, resume=True)
    assert losses(out) == losses(ref)           # every loss, bit for bit, and the same log
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert np.array_equal(p.data, q.data), n
    m_ref, _ = tensorfile.read_safetensors(train.state_path_of(ref))
    m_run, _ = tensorfile.read_safetensors(train.state_path_of(out))
    assert all(np.array_equal(m_ref[k], m_run[k]) for k in m_ref)


def test_ctrl_c_saves_then_resume_continues_exactly(tmp_path, tok, monkeypatch, capsys):
    cfg = replace(TINY, steps=5, ckpt_every=100)      # no periodic checkpoint: only the Ctrl-C one
    ref = str(tmp_path / "ref.safetensors")
    train.pretrain(["builtin:150"], ref, "nano", cfg=cfg, tok=tok)

    out = str(tmp_path / "run.safetensors")
    original, calls = train.clip_grad_norm, []

    def interrupt_during_step_3(params, max_norm):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(params, max_norm)
    monkeypatch.setattr(train, "clip_grad_norm", interrupt_during_step_3)
    result = train.pretrain(["builtin:150"], out, "nano", cfg=cfg, tok=tok)[2]
    monkeypatch.undo()
    assert result["interrupted"] and result["step"] == 3
    assert "--resume" in capsys.readouterr().out
    assert json.loads(tensorfile.read_safetensors(out)[1]["meta"])["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # restored

    assert train.main(["pretrain", "--data", "builtin:150", "--preset", "nano", "--out", out, "--resume"]) == 0
    assert losses(out) == losses(ref)


def test_default_run_resumes_in_the_finetune_phase(tmp_path, tok, monkeypatch):
    pre = replace(TINY, steps=4, ckpt_every=4)
    ft = replace(TINY, steps=4, seq_len=128, lr=1e-3)
    monkeypatch.setattr(train, "train_tokenizer", lambda texts, vocab: tok)  # same vocabulary, faster
    monkeypatch.setattr(corpus, "sample_stories", lambda model, tok, n: ["a story"])
    kw = dict(preset="nano", pre=pre, ft=ft, stories="builtin:150", chats="builtin:80", check=2)
    ref = str(tmp_path / "ref" / "wyrd.safetensors")
    done = train.run_default(ref, **kw)
    assert len(done["replies"]) == 2

    out = str(tmp_path / "run" / "wyrd.safetensors")
    original, calls = train.AdamW.step, []

    def killed_in_finetune_step_3(self, lr):
        calls.append(1)
        if len(calls) == 4 + 3:
            raise RuntimeError("killed")
        original(self, lr)
    monkeypatch.setattr(train.AdamW, "step", killed_in_finetune_step_3)
    with pytest.raises(RuntimeError):
        train.run_default(out, **kw)
    monkeypatch.setattr(train.AdamW, "step", original)
    assert json.loads(tensorfile.read_safetensors(out)[1]["meta"])["phase"] == "finetune"
    again = train.run_default(out, resume=True, **kw)
    assert losses(out) == losses(ref)
    assert [r["phase"] for r in log_of(out)].count("pretrain") == 5   # 4 steps + the final record
    assert again["meta"]["pretrain"] == done["meta"]["pretrain"] and again["meta"]["story_samples"] == ["a story"]
    assert [again[k] for k in ("topic", "recall", "declines")] == [done[k] for k in ("topic", "recall", "declines")]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tok, monkeypatch, capsys):
    tok_path = str(tmp_path / "tokenizer.json")
    tok.save(tok_path)
    out = str(tmp_path / "p.safetensors")
    original, calls = wyrd.Chimera.loss, []

    def nan_at_step_3(self, ids, targets, mask=None):
        calls.append(1)
        loss = original(self, ids, targets, mask)
        if len(calls) == 5:              # the first micro-batch of step 3 (2 per step)
            loss.data = np.asarray(np.nan, dtype=np.float32)
        return loss
    monkeypatch.setattr(wyrd.Chimera, "loss", nan_at_step_3)
    code = train.main(["pretrain", "--data", "builtin:150", "--preset", "nano", "--tokenizer", tok_path,
                       "--out", out, "--steps", "6", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "32",
                       "--ckpt-every", "2", "--eval-every", "0"])
    assert code == 1
    err = capsys.readouterr().err
    assert "step 3: the loss is nan" in err and out in err
    meta = json.loads(tensorfile.read_safetensors(out)[1]["meta"])
    assert meta["step"] == 2


def test_cli_help_lists_every_flag_with_its_default(capsys):
    for command, defaults in (("pretrain", train.PRETRAIN), ("finetune", train.FINETUNE)):
        with pytest.raises(SystemExit) as e:
            train.main([command, "--help"])
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        for f in fields(train.TrainConfig):
            flag = "--" + f.name.replace("_", "-")
            assert flag in text and f"(default: {getattr(defaults, f.name)})" in text, flag
        for flag in ("--data", "--out", "--resume", "(default: builtin)"):
            assert flag in text
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    assert all(c in text for c in ("all", "pretrain", "finetune", "data.py"))
    with pytest.raises(SystemExit):
        data.main(["--help"])
    text = capsys.readouterr().out
    assert all(c in text for c in ("convert", "download", "<|endoftext|>", "OASST"))


def test_cli_errors_name_the_problem(tmp_path, tok, capsys):
    bad = tmp_path / "stories.csv"
    bad.write_text("a,b\n")
    assert train.main(["pretrain", "--data", str(bad), "--preset", "nano", "--seq-len", "32",
                       "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "stories.csv: unrecognised story file" in capsys.readouterr().err
    assert train.main(["finetune", "--data", "builtin:20", "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "--init" in capsys.readouterr().err
    out = str(tmp_path / "p.safetensors")
    assert train.main(["pretrain", "--preset", "nano", "--out", out, "--resume"]) == 2
    assert "no training state to resume" in capsys.readouterr().err
    train.pretrain(["builtin:150"], out, "nano", cfg=replace(TINY, steps=2), tok=tok)
    assert train.main(["pretrain", "--data", "builtin:150", "--preset", "nano", "--out", out, "--resume",
                       "--lr", "0.5"]) == 2
    assert "--lr 0.5 differs from the saved run's 0.003" in capsys.readouterr().err
    assert train.main(["pretrain", "--data", "builtin:151", "--preset", "nano", "--out", out, "--resume"]) == 2
    assert "data or tokenizer differ" in capsys.readouterr().err
    assert train.main(["pretrain", "--preset", "nano", "--seq-len", "4096", "--out", out, "--overwrite"]) == 2
    assert "exceeds the model's max_seq_len 128" in capsys.readouterr().err



@pytest.mark.parametrize("flag, value, says", [
    ("--ckpt-every", "0", "--ckpt-every must be >= 1, got 0"), ("--log-every", "0", "--log-every must be >= 1"),
    ("--seq-len", "0", "--seq-len must be >= 1"), ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--grad-accum", "0", "--grad-accum must be >= 1"), ("--steps", "-5", "--steps must be >= 1, got -5"),
    ("--lr", "nan", "--lr must be a finite number"), ("--lr", "0", "--lr must be > 0"),
    ("--min-lr", "inf", "--min-lr must be a finite number"), ("--eval-every", "-1", "--eval-every must be >= 0")])
def test_every_numeric_flag_is_checked_before_anything_is_written(tmp_path, capsys, flag, value, says):
    out = tmp_path / "p.safetensors"
    assert train.main(["pretrain", "--preset", "nano", "--out", str(out), flag, value]) == 2
    assert says in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_convert_into_a_missing_folder_is_one_line(tmp_path, capsys):
    assert data.main(["convert", "builtin:3", str(tmp_path / "no" / "such" / "chats.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No such file or directory" in err and "chats.jsonl" in err

def test_a_new_run_refuses_to_replace_an_existing_one(tmp_path, tok, capsys):
    tok_path = str(tmp_path / "tokenizer.json")
    tok.save(tok_path)
    out = str(tmp_path / "p.safetensors")
    flags = ["pretrain", "--data", "builtin:150", "--preset", "nano", "--tokenizer", tok_path, "--out", out,
             "--steps", "2", "--batch-size", "2", "--seq-len", "32"]
    assert train.main(flags) == 0
    before = {p: open(p, "rb").read() for p in (out, train.state_path_of(out), train.log_path_of(out))}
    capsys.readouterr()
    assert train.main(flags) == 2
    err = capsys.readouterr().err
    assert f"{out} exists" in err and "--resume" in err and "--overwrite" in err
    assert all(open(p, "rb").read() == b for p, b in before.items())     # nothing touched
    assert train.main(flags + ["--overwrite", "--seed", "1"]) == 0
    assert open(out, "rb").read() != before[out]


def test_a_few_conversations_still_train_with_a_held_out_row(tmp_path, tok):
    init = str(tmp_path / "p.safetensors")
    train.pretrain(["builtin:150"], init, "nano", cfg=replace(TINY, steps=2), tok=tok)
    out = str(tmp_path / "chat.safetensors")
    assert train.main(["finetune", "--data", "builtin:10", "--init", init, "--out", out, "--steps", "2",
                       "--batch-size", "2", "--seq-len", "128"]) == 0
    final = log_of(out)[-1]
    assert final["final"] and math.isfinite(final["val_loss"])
    # the held-out share of a tiny set: one token at least, cut inside the last document if it must be
    tokens = np.array([[5], [6], [1], [7], [8], [9], [1]])        # two documents, eot = 1
    head, tail = data.split_held_out(tokens, eot=1)
    assert len(tail) == 1 and len(head) == 6
    tokens = np.array([[5], [1]] + [[7], [1]] * 30)               # a boundary inside the share: cut there
    head, tail = data.split_held_out(tokens, eot=1)
    assert len(tail) == 2 and head[-1, 0] == 1

def test_download_without_a_network_fails_clearly(tmp_path, monkeypatch, capsys):
    def offline(*a, **k):
        raise data.urllib.error.URLError("no network")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    assert data.main(["download", "oasst", "--dir", str(tmp_path)]) == 2
    assert "cannot download" in capsys.readouterr().err and os.listdir(tmp_path) == []


def unigram_entropy(tokens, vocab_size):
    p = np.bincount(np.asarray(tokens).reshape(-1), minlength=vocab_size) / np.size(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def held_out_curve(tmp_path, tok, init, steps=40):
    """Held-out loss every 5 steps of a nano hybrid (RRA) on builtin stories, from `init`."""
    train_tokens, val_tokens, key = data.load_tokens(["builtin:300"], tok, str(tmp_path))
    cfg = train.TrainConfig(steps=steps, batch_size=8, seq_len=64, lr=5e-3, min_lr=5e-3, warmup=4,
                            eval_every=5, eval_batches=4, ckpt_every=10 ** 6, log_every=10 ** 6)
    rows = data.Rows.stream(train_tokens, cfg.seq_len, tok.eot_id)
    val_rows = data.Rows.stream(val_tokens, cfg.seq_len, tok.eot_id)
    model = wyrd.Chimera(replace(wyrd.get_config("nano"), vocab_size=tok.vocab_size), init=init)
    out = str(tmp_path / f"{init}.safetensors")
    train.train(model, tok, rows, val_rows, cfg, out, "pretrain", key)
    curve = [(r["step"], r["val_loss"]) for r in log_of(out) if "val_loss" in r]  # step 40: the final record
    return curve, unigram_entropy(train_tokens, tok.vocab_size)


def test_wyrd_init_leaves_the_unigram_plateau_within_40_steps(tmp_path, tok):
    """Every model first learns token frequencies (loss = the unigram entropy, 4.77 here);
    Wyrd's init then goes on to use the context (3.96 at step 40 when measured), while
    the reference init, as docs/04 found, is still on the plateau (4.83)."""
    curve, unigram = held_out_curve(tmp_path, tok, "wyrd")
    assert dict(curve)[40] < unigram - 0.5, (curve, unigram)
    ref, _ = held_out_curve(tmp_path, tok, "reference")
    assert dict(ref)[40] > unigram - 0.1, (ref, unigram)


# ---------------------------------------------------------------------------- kills (fault injection)
# A training subprocess is killed (os._exit inside a save, or SIGKILL from outside) and
# then resumed; its log and final weights must match an uninterrupted run bit for bit.

KILLABLE = """
import os, sys
import tensorfile, train
where, n = sys.argv[1], int(sys.argv[2])
calls = []
def die_at(original, match):
    def patched(path, *a, **k):
        if match(path):
            calls.append(path)
            if len(calls) == n:
                os._exit(9)                     # as abrupt as a SIGKILL: no cleanup, no flush
        return original(path, *a, **k)
    return patched
if where == "write":                            # before the n-th safetensors write (state or model)
    tensorfile.write_safetensors = die_at(tensorfile.write_safetensors, lambda p: True)
elif where == "remove":                         # before the n-th removal of the set-aside train state
    os.remove = die_at(os.remove, lambda p: str(p).endswith(".train.prev.safetensors"))
sys.exit(train.main(sys.argv[3:]))
"""


def run_killable(tmp_path, where, n, flags):
    import subprocess
    import sys
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, str(script), where, str(n)] + flags, env=env,
                          capture_output=True, text=True, timeout=300)


def kill_flags(tmp_path, tok, out, steps=6):
    tok_path = str(tmp_path / "tokenizer.json")
    tok.save(tok_path)
    return ["pretrain", "--data", "builtin:150", "--preset", "nano", "--tokenizer", tok_path, "--out", out,
            "--steps", str(steps), "--batch-size", "2", "--grad-accum", "2", "--seq-len", "32",
            "--ckpt-every", "1", "--eval-every", "3", "--log-every", "1"]


def final_weights(out):
    return tensorfile.read_safetensors(out)[0]


@pytest.mark.parametrize("where, n, resumes_from", [
    ("write", 4, 1),    # killed before the step-2 model write: model 1, state 2, set-aside state 1
    ("write", 3, 1),    # killed before the step-2 state write: model 1, no state, set-aside state 1
    ("remove", 1, 2),   # killed after the step-2 model write (step 1 sets nothing aside): both at 2
])
def test_a_kill_inside_a_checkpoint_save_leaves_a_run_that_resumes_exactly(tmp_path, tok, where, n, resumes_from):
    ref = str(tmp_path / "ref.safetensors")
    assert train.main(kill_flags(tmp_path, tok, ref)) == 0
    out = str(tmp_path / "run.safetensors")
    killed = run_killable(tmp_path, where, n, kill_flags(tmp_path, tok, out))
    assert killed.returncode == 9, killed.stderr
    assert json.loads(tensorfile.read_safetensors(out)[1]["meta"])["step"] == resumes_from
    assert train.main(kill_flags(tmp_path, tok, out) + ["--resume"]) == 0
    assert losses(out) == losses(ref)
    assert not os.path.exists(train.prev_state_path_of(out))
    a, b = final_weights(out), final_weights(ref)
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_random_sigkills_during_training_always_leave_a_resumable_run(tmp_path, tok):
    import subprocess
    import sys
    import time
    steps = 60
    ref = str(tmp_path / "ref.safetensors")
    assert train.main(kill_flags(tmp_path, tok, ref, steps)) == 0
    out = str(tmp_path / "run.safetensors")
    rng = np.random.default_rng(0)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    kills = 0
    for attempt in range(8):
        flags = kill_flags(tmp_path, tok, out, steps) + (["--resume"] if os.path.exists(out) else ["--overwrite"])
        proc = subprocess.Popen([sys.executable, os.path.join(env["PYTHONPATH"], "train.py")] + flags, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in proc.stdout:                         # training has started: kill a little later
            if "step" in line and "/" in line:
                time.sleep(rng.uniform(0.0, 0.3))
                break
        proc.kill()
        proc.wait()
        if proc.returncode == 0:
            break
        kills += 1
    assert kills >= 3
    if json.loads(tensorfile.read_safetensors(out)[1]["meta"]).get("step") != steps:
        assert train.main(kill_flags(tmp_path, tok, out, steps) + ["--resume"]) == 0
    assert [r for r in losses(out)] == losses(ref)
    a, b = final_weights(out), final_weights(ref)
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_good_run(tmp_path, tok):
    """The operating system refuses the write (a file-size limit: EFBIG, as ENOSPC would on
    a full disk) in the middle of a checkpoint save: one line, exit code 2, and the run on
    disk is the previous checkpoint, which resumes to the same weights as an unbroken run."""
    import resource
    import subprocess
    import sys
    ref = str(tmp_path / "ref.safetensors")
    assert train.main(kill_flags(tmp_path, tok, ref)) == 0
    out = str(tmp_path / "run.safetensors")
    assert train.main(kill_flags(tmp_path, tok, out, steps=3)) == 0
    limit = os.path.getsize(out) // 2   # the log's lines fit; neither checkpoint file does

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    full = subprocess.run([sys.executable, os.path.join(env["PYTHONPATH"], "train.py")]
                          + kill_flags(tmp_path, tok, out) + ["--resume"], env=env, preexec_fn=small_disk,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 2, full.stderr
    assert full.stderr.count("\n") == 1 and "File too large" in full.stderr and "Traceback" not in full.stderr
    assert json.loads(tensorfile.read_safetensors(out)[1]["meta"])["step"] == 3
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]   # no half-written file left behind
    assert train.main(kill_flags(tmp_path, tok, out) + ["--resume"]) == 0
    assert losses(out)[3:] == losses(ref)[3:]   # (the first run ended at step 3: its last record differs)
    a, b = final_weights(out), final_weights(ref)
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_default_run_seed_reaches_both_phases(tmp_path, monkeypatch):
    """`train.py all --seed N` seeds the init and the data order of pretraining and fine-tuning."""
    seen = {}
    monkeypatch.setattr(train, "run_default", lambda out, resume, preset, pre, ft: seen.update(pre=pre, ft=ft))
    assert train.main(["all", "--seed", "7", "--out", str(tmp_path / "w.safetensors")]) == 0
    assert seen["pre"].seed == 7 and seen["ft"].seed == 7
    assert seen["pre"].steps == train.PRETRAIN.steps and seen["ft"].steps == train.FINETUNE.steps
