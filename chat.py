"""Talk to Wyrd: the REPL, one-shot prompts and pipes, and a small local web chat.

    python chat.py                                  # REPL on out/wyrd.safetensors
    python chat.py --checkpoint PATH --seed 1       # another model, reproducible replies
    python chat.py --prompt "Hello!"                # one reply, then exit
    python chat.py --raw --prompt "Once upon a time"  # continue plain text, no chat template
    printf 'Hi\\nTell me a story\\n' | python chat.py  # each stdin line is one user turn
    python chat.py --serve [--host 127.0.0.1] [--port 5000]   # web chat in the browser
    python chat.py --quantize int8 ...              # any of these with int8 weights

Read top to bottom: the REPL, then the command line. A conversation and how it is
fed to the model are conversation.py; the web server is web.py (its page is in
web/); the sampler and `generate` are sampling.py.
"""
if __name__ == "__main__":  # Ctrl-C while the imports below run (~0.5 s) ends in one line, not a traceback
    import os as _os
    import signal as _signal

    def _interrupted_early(signum, frame):
        try:
            _os.write(2, b"[interrupted]\n")
        except OSError:  # stderr closed
            pass
        _os._exit(130)
    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:  # not if ignored (nohup, a background job)
        _signal.signal(_signal.SIGINT, _interrupted_early)

import sys as _sys

# Where SciPy is installed, Numba's first compile imports its BLAS wrappers (for np.dot in
# jitted code, which no Wyrd kernel has): 16 MB of a chat process. Chat never uses SciPy.
_sys.modules.setdefault("scipy", None)

from runtime import atomic_write

import argparse
import contextlib
import json
import os
import signal
import sys
import threading

import numpy as np

import checkpoint
from conversation import Conversation
from sampling import Settings, complete
from tokenizer import DEFAULT_SYSTEM

DEFAULT_CHECKPOINT = os.path.join("out", "wyrd.safetensors")  # what `python train.py` writes
MAX_MESSAGE = 1 << 20  # characters in one message or prompt: ~250K tokens, about a minute of reading


# ---------------------------------------------------------------------------
# The REPL

HELP = """commands:
  /help                this list
  /reset               start a new conversation
  /system [TEXT]       show the system prompt, or set it and start a new conversation
  /set [NAME VALUE]    show the sampling settings, or change one: temperature (0 = greedy),
                       top_k, top_p, repetition_penalty, penalty_window, max_tokens, seed
  /save FILE           write the conversation to a new FILE as one JSONL line {"messages": [...]}
  /save! FILE          the same, replacing FILE if it is a regular file (never a symbolic link)
  /quit                exit (or Ctrl-D); Ctrl-C stops a reply and keeps the conversation
  //TEXT               send a message that starts with a slash"""


@contextlib.contextmanager
def ctrl_c_stops():
    """Within the block Ctrl-C sets the yielded Event instead of raising KeyboardInterrupt.
    The reply then stops between two model steps: an exception in the middle of
    model.step could leave some layers of the state advanced and others not."""
    hit = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield hit
        return
    old = signal.signal(signal.SIGINT, lambda signum, frame: hit.set())
    try:
        yield hit
    finally:
        signal.signal(signal.SIGINT, old)


# control characters other than newline and tab (C0, DEL, C1): a model's reply could
# otherwise move the cursor, retitle or recolour the user's terminal
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0, 9), *range(11, 32), *range(127, 160)]}


def visible(text):
    """`text` with every terminal control character shown as an escape, e.g. \\x1b."""
    return text.translate(_CONTROL)


class OutputError(Exception):
    """stdout refused a write (a full disk, a reader gone): `error` is the OSError.
    Its own type, so that main tells stdout's failures from a checkpoint's."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


def write_out(out, text):
    """Write text to out and flush it; an OSError becomes OutputError."""
    try:
        out.write(text)
        out.flush()
    except OSError as e:
        raise OutputError(e) from None


def stream(pieces, out=None):
    """Write text pieces to out (stdout) as they come, control characters escaped,
    flushing each. Ctrl-C stops early. -> True if stopped by Ctrl-C."""
    out = out or sys.stdout
    with ctrl_c_stops() as stop:
        try:
            for piece in pieces:
                write_out(out, visible(piece))
                if stop.is_set():
                    break
        finally:
            pieces.close()
    write_out(out, "\n")
    return stop.is_set()


class Repl:
    """Read a line, run a command or answer it, repeat. Replies go to stdout and
    everything else to stderr, so `python chat.py < questions.txt > answers.txt` works."""

    def __init__(self, model, tok, settings, system=DEFAULT_SYSTEM, interactive=True, raw=False):
        self.model, self.tok, self.settings, self.raw = model, tok, settings, raw
        self.interactive = interactive
        self.conv = None if raw else Conversation(model, tok, system)
        self.rng = np.random.default_rng(settings.seed)

    def note(self, text):
        print(text, file=sys.stderr, flush=True)

    def read(self):
        """The next line, or None at the end of input."""
        if not self.interactive:
            line = sys.stdin.readline()
            return line.rstrip("\r\n") if line else None
        while True:
            try:
                return input("> ")
            except KeyboardInterrupt:   # at the prompt, Ctrl-C clears the line
                print(file=sys.stderr)
            except EOFError:
                print(file=sys.stderr)
                return None

    def run(self):
        if self.interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
            self.note("/help for commands, Ctrl-C stops a reply, Ctrl-D quits"
                      + ("; each line is a text to continue" if self.raw else ""))
        while (line := self.read()) is not None:
            if not line.strip():
                continue
            if line.startswith("/") and not line.startswith("//"):
                if not self.command(line):
                    break
                continue
            self.say(line[1:] if line.startswith("//") else line)

    def say(self, text):
        """Answer (or continue) one line, streaming to stdout. -> True if Ctrl-C stopped it."""
        if len(text) > MAX_MESSAGE:
            self.note(f"error: a message of {len(text):,} characters; at most {MAX_MESSAGE:,} (not sent)")
            return False
        if self.raw:
            write_out(sys.stdout, text)
            pieces = complete(self.model, self.tok, text, self.settings, self.rng)
        else:
            pieces = self.conv.turn(text, self.settings, self.rng)
        stopped = stream(pieces)
        if stopped:
            self.note("[stopped]")
        if self.interactive:
            write_out(sys.stdout, "\n")
        return stopped

    def save(self, arg, overwrite):
        """Write the transcript to the file `arg` names (~ expanded): a new file, or with
        overwrite a regular file replaced. A symbolic link is never replaced or followed."""
        path, arg = os.path.expanduser(arg), visible(arg)  # the name as typed, shown safely
        if os.path.islink(path):
            return self.note(f"error: {arg} is a symbolic link; not written (name the file it points to)")
        if os.path.isdir(path):
            return self.note(f"error: {arg} is a directory; not written")
        if os.path.lexists(path):
            if not os.path.isfile(path):  # a device, FIFO or socket: renaming over it would replace it
                return self.note(f"error: {arg} exists and is not a regular file; not written")
            if not overwrite:
                return self.note(f"error: {arg} exists; not written (/save! {arg} replaces it)")
        try:
            with atomic_write(path, "w") as f:  # renames over the path: a link made meanwhile is replaced, not followed
                f.write(json.dumps({"messages": self.conv.messages}, ensure_ascii=False) + "\n")
        except (OSError, ValueError) as e:  # ValueError: a NUL in the name
            return self.note(f"error: cannot write {arg}: {getattr(e, 'strerror', None) or e}")
        self.note(f"[saved {len(self.conv.messages)} messages to {arg}]")

    def command(self, line):
        """Run one /command; False means quit."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            self.note(HELP)
        elif name == "/reset" and self.conv:
            self.conv.reset()
            self.rng = np.random.default_rng(self.settings.seed)
            self.note("[new conversation]")
        elif name == "/system" and self.conv:
            if arg:
                self.conv.reset(system=arg)
                self.rng = np.random.default_rng(self.settings.seed)
                self.note("[system prompt set; new conversation]")
            else:
                self.note(f"system prompt: {self.conv.system}")
        elif name == "/set":
            setting, _, value = arg.partition(" ")
            if not value.strip():
                self.note(self.settings.describe())
                return True
            try:
                self.settings = self.settings.with_value(setting, value.strip())
            except ValueError as e:
                self.note(f"error: {e}")
                return True
            if setting == "seed":
                self.rng = np.random.default_rng(self.settings.seed)
            self.note(self.settings.describe())
        elif name in ("/save", "/save!") and self.conv:
            if not arg:
                self.note(f"usage: {name} FILE")
            else:
                self.save(arg, overwrite=name == "/save!")
        else:
            self.note(f"unknown command {name!r} (in this mode); /help lists them, //TEXT sends a message")
        return True


# ---------------------------------------------------------------------------
# The command line


def load_checkpoint(path, quantize=None):
    """-> (model, tok), or raise SystemExit with one line a user can act on."""
    if not os.path.exists(path):
        if path == DEFAULT_CHECKPOINT:
            raise SystemExit(f"no checkpoint at {path}: make one with `python train.py` "
                             "(offline, on the built-in corpus), or pass --checkpoint PATH")
        raise SystemExit(f"no checkpoint at {path}")
    if not (os.path.isfile(path) or os.path.isdir(path)):  # a FIFO would block the read until a writer came
        raise SystemExit(f"error: {path} is not a regular file (a pipe or a device); pass a checkpoint file")
    try:
        model, tok, _ = checkpoint.load(path, quantize=quantize)
    except ValueError as e:  # CheckpointError, TokenizerError, and json's own (an integer over 4,300 digits)
        raise SystemExit(f"error: {e}" if path in str(e) else f"error: {path}: {e}") from None
    except OSError as e:  # the file went away, or its disk failed, while it was read
        raise SystemExit(f"error: {path}: cannot read it ({e.strerror or e})") from None
    if tok is None:
        raise SystemExit(f"error: {path} holds no tokenizer; save it with checkpoint.save(path, model, tokenizer)")
    if tok.vocab_size > model.config.vocab_size:
        raise SystemExit(f"error: {path}: the tokenizer has {tok.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}")
    return model, tok


def parse_args(argv=None):
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\nRead top")[0],
                                epilog=HELP.replace("commands:", "REPL commands:"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"model file (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--system", default=DEFAULT_SYSTEM, help=f"system prompt (default: {DEFAULT_SYSTEM!r})")
    p.add_argument("--prompt", help="answer this one message, print the reply and exit")
    p.add_argument("--raw", action="store_true", help="continue plain text without the chat template")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"0 = greedy (default: {d.temperature})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"0 = off (default: {d.top_k})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"1 = off (default: {d.top_p})")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help=f"divide positive logits and multiply negative ones of recent tokens; "
                        f"1 = off (default: {d.repetition_penalty})")
    p.add_argument("--penalty-window", type=int, default=d.penalty_window,
                   help=f"recent context tokens the penalty applies to (default: {d.penalty_window})")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"per reply (default: {d.max_tokens})")
    p.add_argument("--seed", type=int, default=None, help="for reproducible replies (default: random)")
    p.add_argument("--quantize", choices=["int8"], help="int8 weights: ~4x faster replies from a large model "
                   "in 40%% of the memory, for a loss < 0.001 nats/token higher (README); needed to read a file "
                   "saved with checkpoint.save(dtype='int8')")
    p.add_argument("--serve", action="store_true", help="run the local web chat instead of the REPL")
    p.add_argument("--host", default="127.0.0.1", help="web chat address; requests naming another host are "
                   "refused, unless it is 0.0.0.0 (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5000, help="web chat port (default: 5000)")
    args = p.parse_args(argv)
    try:
        args.settings = Settings(args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                                 args.penalty_window, args.max_tokens, args.seed)
    except ValueError as e:
        p.error(str(e).replace("_", "-"))
    return args


def standard_streams(serve):
    """Closed standard streams (`>&-`) are None in sys: stdin reads as empty, stderr goes
    to /dev/null, and stdout, where replies go, is an error unless serving the web chat.
    -> a one-line error, or None."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")
    if sys.stdin is None:
        sys.stdin = open(os.devnull)
    if sys.stdout is None:
        if not serve:
            return "error: stdout is closed, so replies have nowhere to go (redirect it to a file or /dev/null)"
        sys.stdout = open(os.devnull, "w")
    return None


def main(argv=None):
    if signal.getsignal(signal.SIGINT) is globals().get("_interrupted_early"):
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the imports are done: Ctrl-C is ours to handle
    try:
        return run(argv)
    except KeyboardInterrupt:  # outside a reply (a reply handles its own Ctrl-C)
        print("[interrupted]", file=sys.stderr)
        return 130
    except OutputError as e:
        # later writes and the flush at exit go to /dev/null, so the one line stays the only one
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(e.error, BrokenPipeError):  # `python chat.py ... | head`: the reader left
            return 1
        with contextlib.suppress(OSError):  # stderr full as well: the exit code says it
            print(f"error: cannot write the reply to stdout: {e.error.strerror or e.error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stderr's reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
        return 1


def run(argv):
    args = parse_args(argv)
    problem = standard_streams(args.serve)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    for f in (sys.stdin, sys.stdout, sys.stderr):  # odd bytes in or out never crash a chat
        with contextlib.suppress(AttributeError, ValueError):
            f.reconfigure(errors="replace")
    interactive = sys.stdin.isatty() and args.prompt is None
    try:
        model, tok = load_checkpoint(args.checkpoint, args.quantize)
        if interactive or args.serve:
            print(f"Wyrd: {args.checkpoint} ({model.num_params() / 1e6:.1f}M parameters"
                  f"{', ' + model.quantized if model.quantized else ''}, "
                  f"vocabulary {tok.vocab_size})", file=sys.stderr, flush=True)
        if args.serve:
            import web  # only the web chat needs the HTTP server
            web.serve(model, tok, args.settings, args.system, args.host, args.port)
            return 0
        try:
            repl = Repl(model, tok, args.settings, args.system, interactive, args.raw)
        except ValueError as e:  # a tokenizer without the ChatML tokens
            raise SystemExit(f"error: {args.checkpoint}: {e}") from None
        if args.prompt is not None:
            return 130 if repl.say(args.prompt) else 0
        repl.run()
        return 0
    except MemoryError:  # e.g. a config whose sliding_window needs a decoding state of terabytes
        raise SystemExit(f"error: {args.checkpoint}: the model and its decoding state need more memory than "
                         "this machine has") from None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit as e:
        if isinstance(e.code, str):  # a user error (a file, a flag), already said in one line: exit code 2
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
