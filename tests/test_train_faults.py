"""train.py under faults injected for real: files that are not a run's at its paths, bad
--out values, stops before the first checkpoint, kills during a save, edited logs and
training states, too little memory, Ctrl-C while loading, a full disk. Each is one line
naming a file or flag, exit code 2 (130 for Ctrl-C), no traceback, nothing of the user's
replaced, and a command that works from there."""
import wyrd

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

import checkpoint
import data
import runtime
import tensorfile
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANO = ["--preset", "nano", "--data", "builtin:200", "--steps", "1", "--batch-size", "4", "--seq-len", "32",
        "--eval-batches", "1"]


def pretrain(out, *flags):
    return ["pretrain"] + NANO + ["--out", str(out)] + list(flags)


def run(capsys, argv):
    """train.main in this process -> (exit code, stderr)."""
    code = train.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(err):
    return err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def cli(argv, script=None, **kw):
    """train.py (or a script that patches it) in a subprocess."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    command = [sys.executable] + ([str(script)] if script else [os.path.join(ROOT, "train.py")])
    return subprocess.run(command + [str(a) for a in argv], env=env, capture_output=True, text=True, timeout=120,
                          **kw)


def contents(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)
            if os.path.isfile(os.path.join(folder, name))}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pretrained nano checkpoint (with its tokenizer) to fine-tune from."""
    out = tmp_path_factory.mktemp("base") / "base.safetensors"
    assert train.main(pretrain(out)) == 0
    return str(out)


# ---------------------------------------------------------------------------- 1: --overwrite replaces only a run's files

def test_a_data_file_named_like_the_log_is_never_replaced(tmp_path, base, capsys):
    """finetune --data X/chats.jsonl --out X/chats.safetensors: the log would be the data."""
    chats = tmp_path / "chats.jsonl"
    assert data.main(["convert", "builtin:20", str(chats)]) == 0
    before = chats.read_bytes()
    flags = ["finetune", "--data", chats, "--init", base, "--out", tmp_path / "chats.safetensors", "--steps", "1",
             "--batch-size", "2", "--eval-batches", "1"]
    for extra in ([], ["--overwrite"], ["--resume"]):
        code, err = run(capsys, flags + extra)
        assert code == 2 and one_line_error(err) and "--data" in err and str(chats) in err, err
        assert chats.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["chats.jsonl"]


@pytest.mark.parametrize("name", ["notes.txt", "notes.safetensors"])
def test_overwrite_never_replaces_an_out_that_is_not_a_checkpoint(tmp_path, capsys, name):
    notes = tmp_path / name
    notes.write_text("my notes\n")
    code, err = run(capsys, pretrain(notes, "--overwrite"))
    assert code == 2 and one_line_error(err) and str(notes) in err, err
    assert notes.read_text() == "my notes\n"


@pytest.mark.parametrize("name, text", [("run.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n'),
                                        ("run.jsonl", b"my own notes\n"),
                                        ("run.train.safetensors", b"\x00" * 64),
                                        ("run.train.prev.safetensors", b"{}")])
def test_overwrite_never_replaces_a_user_file_at_the_log_or_state_path(tmp_path, capsys, name, text):
    path = tmp_path / name
    path.write_bytes(text)
    for extra in ([], ["--overwrite"]):
        code, err = run(capsys, pretrain(tmp_path / "run.safetensors", *extra))
        assert code == 2 and one_line_error(err) and f"{path}: exists and is not" in err, err
        assert contents(tmp_path) == {name: text}


def test_overwrite_never_replaces_a_folder_at_the_log_path(tmp_path, capsys):
    (tmp_path / "run.jsonl").mkdir()
    (tmp_path / "run.jsonl" / "keep.txt").write_text("x")
    code, err = run(capsys, pretrain(tmp_path / "run.safetensors", "--overwrite"))
    assert code == 2 and one_line_error(err) and "run.jsonl: exists and is not" in err, err
    assert os.listdir(tmp_path) == ["run.jsonl"]


def test_links_and_pipes_at_a_runs_paths_are_never_replaced_nor_read(tmp_path, capsys):
    """A run writes regular files only; reading a pipe would wait forever (an alarm fails the test)."""
    os.mkfifo(tmp_path / "f.jsonl")
    os.symlink(os.devnull, tmp_path / "n.jsonl")
    os.mkfifo(tmp_path / "p.safetensors")
    assert run(capsys, pretrain(tmp_path / "r.safetensors"))[0] == 0
    os.symlink(tmp_path / "r.safetensors", tmp_path / "latest.safetensors")

    def stuck(signum, frame):
        pytest.fail("blocked reading a pipe")
    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(30)
    try:
        for out, extra in (("f", ["--overwrite"]), ("n", []), ("p", ["--overwrite"]), ("p", ["--resume"]),
                           ("latest", ["--overwrite"])):
            code, err = run(capsys, pretrain(tmp_path / f"{out}.safetensors", *extra))
            assert code == 2 and one_line_error(err) and "exists and is not a Wyrd" in err, (out, err)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert os.path.islink(tmp_path / "n.jsonl") and os.path.islink(tmp_path / "latest.safetensors")


def test_overwrite_never_replaces_a_model_that_no_run_wrote(tmp_path, base, capsys):
    """A Wyrd model saved outside training (no step in its meta: a converted or exported one)."""
    model, tok, _ = checkpoint.load(base)
    out = tmp_path / "exported.safetensors"
    checkpoint.save(str(out), model, tok)
    before = out.read_bytes()
    code, err = run(capsys, pretrain(out, "--overwrite"))
    assert code == 2 and one_line_error(err) and "not a Wyrd checkpoint" in err, err
    assert out.read_bytes() == before


def test_the_training_data_never_becomes_the_checkpoint(tmp_path, capsys):
    story = tmp_path / "story.txt"
    story.write_text("Once upon a time there was a cat.\n" * 200)
    before = story.read_bytes()
    for extra in ([], ["--overwrite"]):
        code, err = run(capsys, ["pretrain", "--preset", "nano", "--data", story, "--out", story, "--steps", "1"]
                        + extra)
        assert code == 2 and one_line_error(err) and "--out" in err, err
        assert contents(tmp_path) == {"story.txt": before}


def test_out_and_its_files_may_not_be_a_source_even_through_a_link(tmp_path, base, capsys):
    tok = tmp_path / "tok.safetensors"
    os.link(base, tok)                                     # a hard link: another name, the same file
    chats = tmp_path / "c.jsonl"
    assert data.main(["convert", "builtin:20", str(chats)]) == 0
    os.symlink(chats, tmp_path / "link.jsonl")             # the log path is a link to the data
    before = contents(tmp_path)
    cases = [(pretrain(tok, "--tokenizer", tok, "--overwrite"), "--tokenizer"),
             (["finetune", "--data", chats, "--init", base, "--out", tok, "--overwrite"], "--init"),
             (pretrain(tmp_path / "x.safetensors", "--tokenizer", tok), None),          # no collision: a run
             (["finetune", "--data", chats, "--init", base, "--out", base, "--overwrite"], "--init"),
             (["finetune", "--data", tmp_path / "link.jsonl", "--init", base, "--out", tmp_path / "c.safetensors"],
              "--data"),
             (["finetune", "--data", chats, "--init", base, "--out", tmp_path / "link.safetensors"], "--data")]
    for argv, flag in cases:
        code, err = run(capsys, argv)
        if flag is None:
            assert code == 0, err
            continue
        assert code == 2 and one_line_error(err) and flag in err, (argv, err)
    after = contents(tmp_path)
    assert all(after[name] == b for name, b in before.items())


def test_out_may_not_be_another_runs_training_state(tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    assert run(capsys, pretrain(out))[0] == 0
    before = contents(tmp_path)
    code, err = run(capsys, pretrain(train.state_path_of(str(out)), "--overwrite"))
    assert code == 2 and one_line_error(err) and "training state" in err, err
    assert contents(tmp_path) == before


# ---------------------------------------------------------------------------- 2, 3: --out itself

@pytest.mark.parametrize("out", ["run.jsonl", "run", "run.txt", "", ".", "run/", "a.safetensors/b.txt"])
def test_an_out_that_is_not_a_checkpoint_name_is_refused_before_training(tmp_path, monkeypatch, capsys, out):
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, pretrain(out))
    assert code == 2 and one_line_error(err) and "--out" in err and ".safetensors" in err, err
    assert os.listdir(tmp_path) == []


def test_an_out_in_a_folder_that_cannot_be_made_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.safetensors").mkdir()
    for out, says in ((tmp_path / "file" / "sub" / "a.safetensors", "is a file, not a folder"),
                      (tmp_path / "dir.safetensors", "is a folder")):
        code, err = run(capsys, pretrain(out))
        assert code == 2 and one_line_error(err) and says in err, err
    assert sorted(os.listdir(tmp_path)) == ["dir.safetensors", "file"]
    assert os.listdir(tmp_path / "dir.safetensors") == []


def test_an_out_whose_files_names_would_be_too_long_is_refused_before_training(tmp_path, capsys):
    """240 characters fit a file name, but not its training state's temporary (a save after training)."""
    code, err = run(capsys, pretrain(tmp_path / ("a" * 240 + ".safetensors")))
    assert code == 2 and one_line_error(err) and "too long" in err, err
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- 4: no dead end after a stop

def test_a_divergence_before_the_first_checkpoint_is_not_a_dead_end(tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    code, err = run(capsys, pretrain(out, "--lr", "1e30", "--steps", "2"))
    assert code == 1 and one_line_error(err) and "no checkpoint was saved" in err and "kept" not in err, err
    assert not out.exists()
    code, err = run(capsys, pretrain(out, "--resume"))
    assert code == 2 and one_line_error(err) and "without --resume" in err, err
    code, err = run(capsys, pretrain(out))                 # what the messages say: start again
    assert code == 0 and "saved no checkpoint" in err, err
    log = [json.loads(line) for line in open(train.log_path_of(str(out)))]
    assert [r["step"] for r in log] == [1, 1] and log[-1]["final"]   # the diverged run's records are gone


def test_a_divergence_after_a_checkpoint_names_it_and_a_working_command(tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    code, err = run(capsys, pretrain(out, "--lr", "1e30", "--warmup", "4", "--steps", "4", "--ckpt-every", "1"))
    assert code == 1 and one_line_error(err) and f"pretrain step 1, is kept at {out}" in err, err
    assert "--overwrite" in err
    assert run(capsys, pretrain(out, "--overwrite", "--steps", "2"))[0] == 0


def test_a_sigkill_before_the_first_checkpoint_is_not_a_dead_end(tmp_path, capsys):
    out = tmp_path / "k.safetensors"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + pretrain(out, "--steps", "100000", "--ckpt-every", "100000"),
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if "step" in line and "/" in line:                 # training has started, the checkpoint is far away
            break
    proc.kill()
    proc.wait()
    assert os.path.exists(train.log_path_of(str(out))) and not out.exists()
    code, err = run(capsys, pretrain(out, "--resume"))
    assert code == 2 and one_line_error(err) and "without --resume" in err, err
    code, err = run(capsys, pretrain(out))
    assert code == 0, err
    code, err = run(capsys, pretrain(out))                 # now there is a run: it is kept
    assert code == 2 and one_line_error(err) and "--resume" in err


KILL_IN_SAVE = """
import os, signal, sys
import train
n, saves = int(sys.argv[1]), []
fsync = os.fsync
def killing_fsync(fd):
    if ".train.safetensors.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
        saves.append(fd)
        if len(saves) == n:             # the state file is written, not yet renamed: a real SIGKILL
            os.kill(os.getpid(), signal.SIGKILL)
    fsync(fd)
os.fsync = killing_fsync
sys.exit(train.main(sys.argv[2:]))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="finds the file being saved through /proc")
@pytest.mark.parametrize("n", [1, 2])
def test_a_kill_during_a_save_leaves_a_temporary_that_the_next_start_removes(tmp_path, capsys, n):
    """n=1: killed in the first save (a state, no model yet: start again); n=2: in the second (resume)."""
    script = tmp_path / "kill_in_save.py"
    script.write_text(KILL_IN_SAVE)
    out = tmp_path / "run" / "r.safetensors"
    killed = cli([n] + pretrain(out, "--steps", "3", "--ckpt-every", "1"), script)
    assert killed.returncode == -signal.SIGKILL
    temps = [f for f in os.listdir(out.parent) if ".tmp" in f]
    assert len(temps) == 1 and temps[0].startswith("r.train.safetensors.tmp"), temps
    code, err = run(capsys, pretrain(out, "--steps", "3") + (["--resume"] if n == 2 else []))
    assert code == 0, err
    assert not [f for f in os.listdir(out.parent) if ".tmp" in f]


def test_only_temporaries_of_dead_processes_are_removed(tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = {f"t.safetensors.tmp{dead.pid}": False, f"t.jsonl.tmp{dead.pid}": False,
                 f"t.train.prev.safetensors.tmp{dead.pid}": False,
                 f"t.safetensors.tmp{sleeper.pid}": True,           # a run still writing
                 "t.safetensors.tmp99999999999999999999": True,     # not a PID at all
                 "t.safetensors.tmp\u00b2": True, "t.safetensors.tmp": True, f"other.safetensors.tmp{dead.pid}": True}
        for name in names:
            (tmp_path / name).write_text("x")
        code, err = run(capsys, pretrain(out))
        assert code == 0, err
        assert {name: (tmp_path / name).exists() for name in names} == names
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------------- 15: memory

def test_a_run_that_cannot_fit_in_memory_is_refused_at_once(tmp_path, base, capsys):
    out = tmp_path / "big.safetensors"
    t0 = time.time()
    for argv in (pretrain(out, "--batch-size", "100000000"),
                 ["finetune", "--data", "builtin:20", "--init", base, "--out", out, "--batch-size", "100000000"]):
        code, err = run(capsys, argv)
        assert code == 2 and one_line_error(err) and "GB of memory" in err and "GB is available" in err, err
    assert time.time() - t0 < 10 and os.listdir(tmp_path) == []
    need = train.memory_needed(train.PRETRAIN, wyrd.get_config("large"))
    if train.available_memory() is not None and need > train.available_memory():
        code, err = run(capsys, pretrain(out, "--preset", "large", "--batch-size", "8", "--seq-len", "256"))
        assert code == 2 and one_line_error(err) and "GB of memory" in err, err


def test_the_estimate_is_near_what_nano_takes():
    """nano, 128 sequences of 128 tokens: 0.67 GB peak RSS measured."""
    need = train.memory_needed(train.replace(train.PRETRAIN, batch_size=128, seq_len=128), wyrd.get_config("nano"))
    assert 0.5e9 < need < 1.0e9


def test_running_out_of_memory_while_training_is_one_line(tmp_path):
    """An address-space limit makes NumPy's allocations fail (MemoryError) within the estimate."""
    def small_memory():
        resource.setrlimit(resource.RLIMIT_AS, (700 << 20, 700 << 20))
    proc = cli(pretrain(tmp_path / "m.safetensors", "--batch-size", "300", "--seq-len", "128"),
               preexec_fn=small_memory)
    assert proc.returncode == 2 and one_line_error(proc.stderr) and "out of memory" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------- 16: malformed log lines

@pytest.mark.parametrize("line", [b"[1,2]\n", b'{"step":"x"}\n', b"\xff\xfe\n", b'{"phase":"pretrain","step":1e400}\n',
                                  b"null\n", b'{"phase":["pretrain"],"step":1}\n', b"\x00\x00\x00\n",
                                  b'{"phase":"pretrain","step":true}\n', b'{"phase": "pretrain", "st'])
def test_a_malformed_log_line_is_dropped_with_a_note_on_resume(tmp_path, capsys, line):
    out = tmp_path / "r.safetensors"
    assert run(capsys, pretrain(out))[0] == 0
    log = train.log_path_of(str(out))
    with open(log, "ab") as f:
        f.write(line)
    code, err = run(capsys, pretrain(out, "--resume", "--steps", "2"))
    assert code == 0 and err.startswith(f"note: {log}: dropped 1 line") and "line 3" in err, err
    records = [json.loads(text) for text in open(log, encoding="utf-8")]
    assert [(r["step"], r.get("final", False)) for r in records] == [(1, False), (2, False), (2, True)]


def test_a_log_of_nothing_but_garbage_is_one_line(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    assert run(capsys, pretrain(out))[0] == 0
    log = train.log_path_of(str(out))
    with open(log, "wb") as f:
        f.write(b"\xff\xfe garbage\n[1,2]\n")
    code, err = run(capsys, pretrain(out, "--resume"))
    assert code == 2 and one_line_error(err) and log in err, err
    assert open(log, "rb").read() == b"\xff\xfe garbage\n[1,2]\n"


# ---------------------------------------------------------------------------- 17: edited or older train states

def _edits(state):
    config = state["config"]
    return {
        "no config": ({k: v for k, v in state.items() if k != "config"}, "has no 'config'"),
        "no phase": ({k: v for k, v in state.items() if k != "phase"}, "has no 'phase'"),
        "a list": ([1, 2], "is a JSON list"),
        "unknown setting": (dict(state, config=dict(config, dropout=0.1)), "unknown setting 'dropout'"),
        "missing setting": (dict(state, config={k: v for k, v in config.items() if k != "seed"}), "no 'seed'"),
        "step as text": (dict(state, step="1"), "has step '1'"),
        "negative step": (dict(state, step=-1), "has step -1"),
        "unknown phase": (dict(state, phase="rlhf"), "has phase 'rlhf'"),
        "config a list": (dict(state, config=[1]), "has config [1]"),
        "lr as text": (dict(state, config=dict(config, lr="fast")), "lr 'fast'"),
        "nested too deep": ("[" * 100000 + "]" * 100000, "not a Wyrd training state"),
    }


def test_an_edited_training_state_is_one_line_naming_the_file(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    assert run(capsys, pretrain(out))[0] == 0
    path = train.state_path_of(str(out))
    tensors, metadata = tensorfile.read_safetensors(path)
    for name, (state, says) in _edits(json.loads(metadata["wyrd_train_state"])).items():
        text = state if isinstance(state, str) else json.dumps(state)
        tensorfile.write_safetensors(path, tensors, {"wyrd_train_state": text})
        code, err = run(capsys, pretrain(out, "--resume"))
        assert code == 2 and one_line_error(err) and f"{path}: " in err and says in err, (name, err)
    tensorfile.write_safetensors(path, tensors, metadata)
    assert run(capsys, pretrain(out, "--resume"))[0] == 0


def test_a_missing_or_broken_model_on_resume_is_reported_as_such(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    assert run(capsys, pretrain(out))[0] == 0
    good = out.read_bytes()
    out.unlink()
    code, err = run(capsys, pretrain(out, "--resume"))
    assert code == 2 and one_line_error(err) and "no checkpoint to resume from" in err and "meta" not in err, err
    out.write_bytes(b"garbage")
    code, err = run(capsys, pretrain(out, "--resume"))
    assert code == 2 and one_line_error(err) and "not a safetensors file" in err, err
    tensorfile.write_safetensors(str(out), {}, {"format": "wyrd", "meta": "[1]"})
    code, err = run(capsys, pretrain(out, "--resume"))
    assert code == 2 and one_line_error(err) and "__metadata__['meta']" in err, err
    out.write_bytes(good)
    os.remove(train.state_path_of(str(out)))                # a model whose state is gone: not resumable
    code, err = run(capsys, pretrain(out, "--resume"))
    assert code == 2 and one_line_error(err) and "--overwrite" in err, err
    code, err = run(capsys, pretrain(out))
    assert code == 2 and one_line_error(err) and "--overwrite" in err and "--resume" not in err, err
    assert run(capsys, pretrain(out, "--overwrite"))[0] == 0


# ---------------------------------------------------------------------------- 20: Ctrl-C while loading

@pytest.mark.parametrize("delay", [0.1, 0.2, 0.3])
def test_ctrl_c_while_the_libraries_load_is_one_line(tmp_path, delay):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + pretrain(tmp_path / "c.safetensors"),
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert proc.returncode in (0, 130) and err.strip() in ("", "interrupted"), err  # 0: it was already training


# ---------------------------------------------------------------------------- 21: a full disk names the file

def test_a_failed_write_names_the_file_not_its_temporary(tmp_path):
    """A file-size limit (SIGXFSZ is ignored, so write raises EFBIG as on a full disk)."""
    path = tmp_path / "big.bin"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError) as e:
            with runtime.atomic_write(path) as f:
                f.write(b"x" * 10000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert e.value.filename == str(path) and e.value.strerror
    assert os.listdir(tmp_path) == []


def _limited(limit):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_full_disk_during_a_checkpoint_names_the_checkpoint(tmp_path):
    out = tmp_path / "f.safetensors"
    proc = cli(pretrain(out), preexec_fn=_limited(200_000))   # the token cache fits, the training state not
    assert proc.returncode == 2 and one_line_error(proc.stderr), proc.stderr
    assert proc.stderr.startswith(f"error: {train.state_path_of(str(out))}: "), proc.stderr
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_a_full_disk_while_logging_names_the_log(tmp_path, capsys):
    out = tmp_path / "g.safetensors"
    assert run(capsys, pretrain(out))[0] == 0
    log = train.log_path_of(str(out))
    proc = cli(pretrain(out, "--resume", "--steps", "3", "--ckpt-every", "100"),
               preexec_fn=_limited(os.path.getsize(log) + 40))
    assert proc.returncode == 2 and one_line_error(proc.stderr), proc.stderr
    assert proc.stderr.startswith(f"error: {log}: "), proc.stderr


@pytest.mark.parametrize("edit", ["drop", "rename"])
def test_a_tokenizer_without_the_tokens_a_phase_needs_is_one_line(tmp_path, base, capsys, edit):
    """Pretraining ends stories with <|endoftext|>; fine-tuning also writes ChatML's tokens."""
    tok = checkpoint.read_tokenizer(str(base))
    doc = json.loads(tok.to_json())
    specials = doc["added_tokens"]
    if edit == "drop":
        del specials[0]                                  # <|endoftext|>: the last id, so ids stay dense
        specials[:] = [dict(t, id=t["id"] - 1) for t in specials]
    else:
        specials[0]["content"] = "<|end|>"
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    code, err = run(capsys, pretrain(tmp_path / "run.safetensors", "--tokenizer", path))
    assert code == 2 and one_line_error(err) and str(path) in err and "no <|endoftext|> special token" in err, err
    tensors, meta = tensorfile.read_safetensors(str(base))
    meta["tokenizer"] = json.dumps(dict(json.loads(meta["tokenizer"]), added_tokens=json.loads(tok.to_json())
                                        ["added_tokens"][:1]))   # <|endoftext|> only: no ChatML
    init = tmp_path / "init.safetensors"
    tensorfile.write_safetensors(str(init), tensors, meta)
    code, err = run(capsys, ["finetune", "--data", "builtin:20", "--init", init, "--steps", "1",
                             "--out", tmp_path / "chat.safetensors"])
    assert code == 2 and one_line_error(err) and str(init) in err and "<|im_start|>" in err, err


def test_a_tokenizer_larger_than_the_preset_says_what_it_costs(tmp_path, capsys, monkeypatch):
    """The model takes the tokenizer's vocabulary: a big tokenizer on a small preset is said, and
    refused at once when the run would not fit (a 4 MB tokenizer.json made nano a 3 GB run)."""
    from tokenizer import Tokenizer
    tok = Tokenizer.train(data.tokenizer_texts(["builtin:200"]), 700)
    assert tok.vocab_size > wyrd.get_config("nano").vocab_size
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    code, err = run(capsys, pretrain(tmp_path / "run.safetensors", "--tokenizer", path))
    assert code == 0 and f"note: {path}: its {tok.vocab_size:,} tokens become nano's vocabulary" in err, err
    monkeypatch.setattr(train, "available_memory", lambda: 50e6)
    code, err = run(capsys, pretrain(tmp_path / "other.safetensors", "--tokenizer", path))
    assert code == 2 and one_line_error(err) and "GB is available" in err, err
    assert not os.path.exists(tmp_path / "other.safetensors")


def test_resume_with_another_preset_or_with_overwrite_is_one_line(tmp_path, capsys):
    out = tmp_path / "run.safetensors"
    assert run(capsys, pretrain(out))[0] == 0
    before = contents(tmp_path)
    for flags, says in [(["--resume", "--preset", "micro"], "--preset micro differs from the saved run's nano"),
                        (["--resume", "--overwrite"], "pass one of them")]:
        argv = [a for a in pretrain(out) if a not in ("--preset", "nano")] + flags
        code, err = run(capsys, argv)
        assert code == 2 and one_line_error(err) and says in err, (flags, err)
    assert contents(tmp_path) == before
    code, err = run(capsys, pretrain(out, "--resume", "--steps", "2"))   # the same preset again is fine
    assert code == 0, err
