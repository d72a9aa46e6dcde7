"""Talk to Wyrd: the REPL, one-shot prompts and pipes, and a small local web chat.

    python chat.py                                  # REPL on out/wyrd.safetensors
    python chat.py --checkpoint PATH --seed 1       # another model, reproducible replies
    python chat.py --prompt "Hello!"                # one reply, then exit
    python chat.py --raw --prompt "Once upon a time"  # continue plain text, no chat template
    printf 'Hi\\nTell me a story\\n' | python chat.py  # each stdin line is one user turn
    python chat.py --serve [--host 127.0.0.1] [--port 5000]   # web chat in the browser
    python chat.py --quantize int8 ...              # any of these with int8 weights

Read top to bottom: the conversation, the REPL, the web server, the command
line. The sampler and `generate` are model-side code, in sampling.py.

How a conversation is fed. Decoding state is O(1): a recurrent `h` per RG-LRU
layer and a ring buffer of the last `sliding_window` keys and values per
attention layer (wyrd.DecodeState). It carries from turn to turn, so a turn
feeds only its new tokens, as one chunk:

    first turn:  <|im_start|>system\\n...<|im_end|>\\n  <|im_start|>user\\n...<|im_end|>\\n  <|im_start|>assistant\\n
    later turns: \\n  <|im_start|>user\\n...<|im_end|>\\n  <|im_start|>assistant\\n

then samples the reply token by token. The reply's tokens and its <|im_end|>
enter the state as they are sampled, and the "\\n" that follows <|im_end|> in
the template opens the next turn's chunk. A reply cut short (max tokens,
Ctrl-C, a web client gone) is closed with <|im_end|>\\n, so the state always
holds exactly the ChatML text of the transcript. The cost of a turn does not
grow with the length of the conversation, and neither does memory.
"""
from runtime import atomic_write  # first: the thread policy must be in place when NumPy loads

import argparse
import contextlib
import dataclasses
import http.cookies
import json
import os
import secrets
import signal
import sys
import threading
from collections import OrderedDict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

import wyrd
from sampling import Settings, complete, generate
from tokenizer import DEFAULT_SYSTEM

DEFAULT_CHECKPOINT = os.path.join("out", "wyrd.safetensors")  # what `python train.py` writes


# ---------------------------------------------------------------------------
# A conversation


class Conversation:
    """One chat: its messages and the decoding state that has read them.

    `pending` holds the ids that belong in the state before the next user turn:
    the system block at first; after a reply, <|im_end|>\\n (plus the reply's last
    token if it was cut short). `state.pos` is the number of tokens read so far.
    """

    def __init__(self, model, tok, system=DEFAULT_SYSTEM):
        if tok.im_start_id is None or tok.im_end_id is None:
            raise ValueError("this tokenizer has no <|im_start|>/<|im_end|> tokens, so it cannot chat; "
                             "use --raw to continue plain text")
        self.model, self.tok = model, tok
        self.stop_ids = {i for i in (tok.im_end_id, tok.eot_id) if i is not None}
        # `<|im_start|>assistant\n` exactly as the template renders the generation prompt
        self.assistant_prefix = tok.render_chat([], add_generation_prompt=True)[0][len(tok.render_chat([])[0]):]
        self.system = system
        self.reset()

    def reset(self, system=None):
        """Start over (with a new system prompt if given)."""
        if system is not None:
            self.system = system
        self.messages = [{"role": "system", "content": self.system}]
        self.state = self.model.init_state(1)
        self.pending = self.tok.render_message("system", self.system)[0]
        self.recent = deque()

    def turn(self, text, settings, rng):
        """Feed the user's message, then yield the reply as text pieces while it is
        sampled (whole UTF-8 characters only). Closing this generator early (Ctrl-C, a
        client gone) ends the reply there; the transcript and the state stay in step."""
        user = self.tok.render_message("user", text)[0]   # the text is encoded as text: no special ids
        prompt = self.pending + user + self.assistant_prefix
        self.messages.append({"role": "user", "content": text})
        if self.recent.maxlen != settings.penalty_window:
            self.recent = deque(self.recent, maxlen=settings.penalty_window)
        reply, last, decoder = [], None, self.tok.stream_decoder()
        try:
            for last in generate(self.model, self.tok, self.state, prompt, settings, rng, self.stop_ids, self.recent):
                if last in self.stop_ids:
                    break
                reply.append(last)
                piece = decoder.push(last)
                if piece:
                    yield piece
            piece = decoder.flush()
            if piece:
                yield piece
        finally:
            # generate never feeds the last id it yielded: a stop id gives way to the
            # template's <|im_end|>; an ordinary one (a cut reply) goes in before it.
            unfed = [last] if last is not None and last not in self.stop_ids else []
            self.pending = unfed + [self.tok.im_end_id] + self.tok.encode("\n")
            self.messages.append({"role": "assistant", "content": self.tok.decode(reply)})

    def reply(self, text, settings, rng):
        """The whole reply as one string."""
        return "".join(self.turn(text, settings, rng))


# ---------------------------------------------------------------------------
# The REPL

HELP = """commands:
  /help                this list
  /reset               start a new conversation
  /system [TEXT]       show the system prompt, or set it and start a new conversation
  /set [NAME VALUE]    show the sampling settings, or change one: temperature (0 = greedy),
                       top_k, top_p, repetition_penalty, penalty_window, max_tokens, seed
  /save FILE           write the conversation as one JSONL line {"messages": [...]}
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


def stream(pieces, out=None):
    """Write text pieces to out (stdout) as they come, control characters escaped,
    flushing each. Ctrl-C stops early. -> True if stopped by Ctrl-C."""
    out = out or sys.stdout
    with ctrl_c_stops() as stop:
        try:
            for piece in pieces:
                out.write(visible(piece))
                out.flush()
                if stop.is_set():
                    break
        finally:
            pieces.close()
    out.write("\n")
    out.flush()
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
        if self.raw:
            sys.stdout.write(text)
            pieces = complete(self.model, self.tok, text, self.settings, self.rng)
        else:
            pieces = self.conv.turn(text, self.settings, self.rng)
        stopped = stream(pieces)
        if stopped:
            self.note("[stopped]")
        if self.interactive:
            print()
        return stopped

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
        elif name == "/save" and self.conv:
            if not arg:
                self.note("usage: /save FILE")
                return True
            try:
                with atomic_write(arg, "w") as f:
                    f.write(json.dumps({"messages": self.conv.messages}, ensure_ascii=False) + "\n")
                self.note(f"[saved {len(self.conv.messages)} messages to {arg}]")
            except OSError as e:
                self.note(f"error: cannot write {arg}: {e.strerror}")
        else:
            self.note(f"unknown command {name!r} (in this mode); /help lists them, //TEXT sends a message")
        return True


# ---------------------------------------------------------------------------
# The web chat: one page (its HTML, style and script are the three strings below),
# GET /api/settings gives the server's defaults, POST /api/chat streams a reply as
# JSON lines, POST /api/reset starts over. Standard library only; the page runs
# only its own script (CSP).

MAX_BODY = 64 * 1024     # bytes of request body, else 413
MAX_SESSIONS = 64        # conversations kept; the least recently used goes first
COOKIE = "wyrd_session"
WEB_SETTINGS = {"temperature": float, "top_k": int, "top_p": float, "max_tokens": int}  # what the page may set
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Wyrd</title><link rel="stylesheet" href="/app.css"><script src="/app.js" defer></script></head>
<body>
<header><h1>Wyrd</h1><button type="button" id="new">New chat</button></header>
<details id="panel"><summary>Settings</summary>
<div class="grid">
<label>Temperature <input id="temperature" type="number" min="0" step="0.1"></label>
<label>Top-k <input id="top_k" type="number" min="0" step="1"></label>
<label>Top-p <input id="top_p" type="number" min="0" max="1" step="0.05"></label>
<label>Max tokens <input id="max_tokens" type="number" min="1" step="1"></label>
</div>
<label class="wide">System prompt (used from the next new chat)<textarea id="system" rows="2"></textarea></label>
<div id="speech" class="grid">
<label class="check"><input type="checkbox" id="aloud"> Read replies aloud</label>
<label>Voice <select id="voice"></select></label>
<label>Rate <input id="rate" type="number" min="0.5" max="2" step="0.1"></label>
</div>
<p id="nospeech" hidden>This browser has no speech synthesis, so replies cannot be read aloud.</p>
</details>
<main id="log" role="log" aria-live="polite"></main>
<p id="status" role="status"></p>
<form id="form">
<textarea id="box" rows="2" aria-label="Message" placeholder="Say something (Enter sends, Shift+Enter: new line)" autofocus></textarea>
<div class="buttons"><button id="send">Send</button><button type="button" id="stop" disabled>Stop</button></div>
</form>
</body></html>
"""

STYLE = """
[hidden] { display: none !important; }
body { font: 16px/1.45 system-ui, sans-serif; max-width: 46em; margin: 0 auto; padding: .5em 1em 1em;
  box-sizing: border-box; height: 100vh; height: 100dvh; display: flex; flex-direction: column; }
/* the conversation scrolls in its own box, so the form and its buttons never move while a reply streams */
header { display: flex; align-items: center; justify-content: space-between; }
h1 { font-size: 1.4em; margin: .3em 0; }
button, input, select, textarea { font: inherit; }
button { padding: .35em .9em; }
:focus-visible { outline: 3px solid #1a73e8; outline-offset: 2px; }
details { margin: .3em 0 .8em; padding: .4em .7em; background: #f4f4f6; border-radius: 6px; }
summary { cursor: pointer; }
.grid { display: flex; flex-wrap: wrap; gap: .5em 1.2em; margin: .5em 0; }
.grid label { display: flex; flex-direction: column; font-size: .9em; }
.grid label.check { flex-direction: row; align-items: center; gap: .3em; }
.grid input[type=number] { width: 6em; }
label.wide { display: block; font-size: .9em; }
label.wide textarea { display: block; width: 100%; box-sizing: border-box; }
#log { flex: 1; min-height: 6em; overflow-y: auto; }
.msg { white-space: pre-wrap; overflow-wrap: anywhere; margin: .7em 0; }
.user { color: #444; } .user::before { content: "you: "; font-weight: bold; }
.bot::before { content: "wyrd: "; font-weight: bold; }
.stopped::after { content: " [stopped]"; color: #888; }
#status { min-height: 1.2em; color: #555; margin: .3em 0; }
#status.error { color: #b00020; }
form { display: flex; gap: .5em; align-items: flex-end; }
form textarea { flex: 1; box-sizing: border-box; resize: vertical; padding: .35em; }
.buttons { display: flex; flex-direction: column; gap: .3em; }
@media (max-width: 30em) { form { flex-direction: column; align-items: stretch; }
  .buttons { flex-direction: row; } .buttons button { flex: 1; } }
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const log = $("log"), box = $("box"), send = $("send"), stop = $("stop"), statusLine = $("status");
const SETTINGS = ["temperature", "top_k", "top_p", "max_tokens"];
const synth = window.speechSynthesis;
let streaming = null;                     // the AbortController of the reply being streamed

const store = {                           // remembered in this browser: settings, system prompt, voice
  get(key, fallback) {
    try { const v = localStorage.getItem("wyrd." + key); return v === null ? fallback : JSON.parse(v); }
    catch (e) { return fallback; }
  },
  set(key, value) { try { localStorage.setItem("wyrd." + key, JSON.stringify(value)); } catch (e) {} },
};

function say(text, error) { statusLine.textContent = text; statusLine.className = error ? "error" : ""; }

function add(cls, text) {
  const div = document.createElement("div");
  div.className = "msg " + cls;
  div.textContent = text;                 // text, never HTML
  log.append(div);
  div.scrollIntoView({block: "end"});
  return div;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function post(path, body, signal) {
  // 409: the server is still closing a reply that was just stopped; it frees up within moments
  for (let attempt = 0; ; attempt++) {
    const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                 body: JSON.stringify(body), signal});
    if (r.status !== 409 || attempt >= 20) return r;
    await sleep(150);
  }
}

const GONE = "Cannot reach the server: is `python chat.py --serve` still running?";

function settings() {
  const out = {};
  for (const name of SETTINGS) {
    const v = $(name).value.trim();
    if (v !== "") out[name] = Number(v);  // not a number -> null: the server says which setting
  }
  return out;
}

async function ask(text) {
  say("");
  const user = add("user", text), bot = add("bot", "");
  const controller = new AbortController();
  streaming = controller; send.disabled = true; stop.disabled = false;
  let finished = false;
  try {
    const r = await post("/api/chat", {message: text, settings: settings()}, controller.signal);
    if (!r.ok) {                          // nothing was said: give the text back
      user.remove(); bot.remove(); box.value = text;
      say(r.status === 409 ? "Wyrd is busy with another reply in this chat; try again in a moment."
                           : "The server says: " + await r.text(), true);
      return;
    }
    const reader = r.body.getReader(), utf8 = new TextDecoder(), shown = document.createTextNode("");
    bot.append(shown);
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += utf8.decode(value, {stream: true});
      const lines = buffer.split("\n");
      buffer = lines.pop();
      let text = "";                      // one update per chunk read, however many pieces it holds
      for (const line of lines) {
        const m = JSON.parse(line);
        if (m.text) text += m.text;
        if (m.done) finished = true;
      }
      if (text) { shown.appendData(text); bot.scrollIntoView({block: "end"}); }
    }
    if (finished) speak(bot.textContent);
    else say("The reply was cut off: the server stopped or went away.", true);
  } catch (e) {
    if (e.name === "AbortError") bot.classList.add("stopped");
    else {
      say(GONE, true);
      if (!bot.textContent) { user.remove(); bot.remove(); box.value = text; }  // nothing was said
    }
  } finally {
    streaming = null; send.disabled = false; stop.disabled = true; box.focus();
  }
}

async function newChat() {
  if (streaming) streaming.abort();
  if (synth) synth.cancel();
  try {
    const r = await post("/api/reset", {system: $("system").value});
    if (!r.ok) { say("The server says: " + await r.text(), true); return; }
    log.textContent = "";
    say("");
  } catch (e) { say(GONE, true); }
  box.focus();
}

function speak(text) {
  if (!synth || !$("aloud").checked || !text.trim()) return;
  const utterance = new SpeechSynthesisUtterance(text);
  const voice = synth.getVoices().find((v) => v.name === $("voice").value);
  if (voice) utterance.voice = voice;
  utterance.rate = Number($("rate").value) || 1;
  synth.speak(utterance);
}

function listVoices() {
  const select = $("voice"), voices = synth.getVoices();
  select.textContent = "";
  select.append(new Option(voices.length ? "default" : "default (the browser lists no voices)", ""));
  for (const v of voices) select.append(new Option(v.name + " (" + v.lang + ")", v.name));
  select.value = store.get("voice", "");
  if (select.value !== store.get("voice", "")) select.value = "";
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = box.value;
  if (!text.trim() || streaming) return;
  box.value = "";
  ask(text);
});
box.addEventListener("keydown", (e) => {  // Enter sends, Shift+Enter is a new line
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("form").requestSubmit(); }
});
stop.addEventListener("click", () => { if (streaming) streaming.abort(); });
$("new").addEventListener("click", newChat);

async function start() {
  let defaults = {};
  try { defaults = await (await fetch("/api/settings")).json(); } catch (e) { say(GONE, true); }
  for (const name of [...SETTINGS, "system"]) {
    $(name).value = store.get(name, defaults[name] ?? "");
    $(name).addEventListener("change", () => store.set(name, $(name).value));
  }
  $("rate").value = store.get("rate", 1);
  $("rate").addEventListener("change", () => store.set("rate", $("rate").value));
  $("aloud").checked = store.get("aloud", false);
  $("aloud").addEventListener("change", () => store.set("aloud", $("aloud").checked));
  if (synth) {
    listVoices();
    synth.addEventListener("voiceschanged", listVoices);
    $("voice").addEventListener("change", () => store.set("voice", $("voice").value));
  } else {
    $("speech").hidden = true;
    $("nospeech").hidden = false;
  }
  await newChat();                          // a page starts a new conversation, with its system prompt
}
start();
"""


class SharedModel:
    """The model as many request threads use it: each has its own state and the
    weights are only read, but steps run one at a time (two at once would only
    fight over the same cores' BLAS and Numba threads)."""

    def __init__(self, model):
        self.model, self.lock = model, threading.Lock()

    def init_state(self, batch_size=1):
        return self.model.init_state(batch_size)

    def step(self, ids, state):
        with self.lock:
            return self.model.step(ids, state)


class WebSession:
    def __init__(self, conv, rng):
        self.conv, self.rng, self.lock = conv, rng, threading.Lock()


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, model, tok, settings, system=DEFAULT_SYSTEM):
        super().__init__(address, ChatHandler)
        host = address[0]
        # Host headers we answer: a page on another site that points a DNS name at this
        # address (DNS rebinding) sends its own name and is refused. Bound to every
        # address (0.0.0.0, ::), the user asked to be reached by any name.
        self.hosts = None if host in ("", "0.0.0.0", "::") else {host, "localhost", "127.0.0.1", "::1"}
        self.model, self.tok, self.settings, self.system = SharedModel(model), tok, settings, system
        self.sessions = OrderedDict()   # session id -> WebSession, least recently used first
        self.sessions_lock = threading.Lock()

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)  # a client that left is not an error

    def session(self, sid):
        """-> (session id, WebSession); a new one for an unknown or missing id."""
        with self.sessions_lock:
            if sid in self.sessions:
                self.sessions.move_to_end(sid)
                return sid, self.sessions[sid]
            sid = secrets.token_hex(16)
            self.sessions[sid] = WebSession(Conversation(self.model, self.tok, self.system),
                                            np.random.default_rng(self.settings.seed))
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
            return sid, self.sessions[sid]


def web_settings(base, given):
    """The server's settings with the page's changes, checked as the command line checks
    them; raises ValueError with the message for a 400."""
    if not isinstance(given, dict):
        raise ValueError("settings must be a JSON object")
    changes = {}
    for name, value in given.items():
        kind = WEB_SETTINGS.get(name)
        if kind is None:
            raise ValueError(f"unknown setting {name!r}; known: {', '.join(WEB_SETTINGS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {json.dumps(value)}")
        changes[name] = kind(value)
    return dataclasses.replace(base, **changes)  # Settings checks the ranges


class ChatHandler(BaseHTTPRequestHandler):
    server_version = "Wyrd"
    timeout = 60  # seconds a client may take to send its request

    def host_refused(self):
        """Answer 421 to a Host header that is not one of the server's names."""
        host = self.headers.get("Host", "")
        name = host[1:host.find("]")] if host.startswith("[") else host.split(":")[0]  # no port
        if self.server.hosts is None or name in self.server.hosts:
            return False
        self.close_connection = True
        self.reply(421, "text/plain", b"unexpected Host header: start chat.py with --host set to this name")
        return True

    def do_GET(self):
        if self.host_refused():
            return
        path = self.path.split("?")[0]
        if path == "/api/settings":
            s = self.server.settings
            defaults = {name: getattr(s, name) for name in WEB_SETTINGS} | {"system": self.server.system}
            return self.reply(200, "application/json", json.dumps(defaults).encode())
        files = {"/": ("text/html", PAGE), "/app.css": ("text/css", STYLE), "/app.js": ("text/javascript", SCRIPT)}
        if path not in files:
            return self.reply(404, "text/plain", b"not found")
        kind, text = files[path]
        self.reply(200, kind + "; charset=utf-8", text.encode("utf-8"))

    def do_POST(self):
        if self.host_refused():
            return
        if self.path not in ("/api/chat", "/api/reset"):
            return self.reply(404, "text/plain", b"not found")
        body = self.read_json()
        if body is None:
            return
        message, system = body.get("message"), body.get("system")
        if self.path == "/api/chat" and not (isinstance(message, str) and message.strip()):
            return self.reply(400, "text/plain", b'expected JSON {"message": "some text"}')
        if system is not None and not isinstance(system, str):
            return self.reply(400, "text/plain", b"system must be a string")
        try:
            settings = web_settings(self.server.settings, body.get("settings", {}))
        except ValueError as e:
            return self.reply(400, "text/plain", str(e).encode())
        try:
            cookie = http.cookies.SimpleCookie(self.headers.get("Cookie", ""))
        except http.cookies.CookieError:
            cookie = {}
        sid, session = self.server.session(cookie[COOKIE].value if COOKIE in cookie else None)
        if not session.lock.acquire(blocking=False):  # one request at a time per conversation
            return self.reply(409, "text/plain", b"a reply is still being written in this conversation", sid)
        try:
            if self.path == "/api/reset":
                session.conv.reset(system)
                return self.reply(200, "application/json", b'{"ok": true}', sid)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson; charset=utf-8")
            self.send_common_headers(sid)
            self.end_headers()          # HTTP/1.0: the body ends when the connection closes
            pieces = session.conv.turn(message, settings, session.rng)
            try:
                for piece in pieces:
                    self.wfile.write((json.dumps({"text": piece}) + "\n").encode("utf-8"))
                self.wfile.write(b'{"done": true}\n')
            except (BrokenPipeError, ConnectionResetError):
                pass                    # the reader left (Stop, or gone): the reply ends here
            finally:
                pieces.close()
        finally:
            session.lock.release()

    def read_json(self):
        """The request body as a JSON object, or None after sending the error."""
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            # also makes a cross-site form post impossible without a CORS preflight we never grant
            self.reply(415, "text/plain", b"send Content-Type: application/json")
            return None
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.reply(411, "text/plain", b"Content-Length required")
            return None
        if length < 0:  # reading -1 bytes would wait for the client to close
            self.close_connection = True
            self.reply(400, "text/plain", b"Content-Length must be >= 0")
            return None
        if length > MAX_BODY:
            if length <= 16 * MAX_BODY:  # drop it, so the client reads the 413 rather than a reset
                self.rfile.read(length)
            self.close_connection = True
            self.reply(413, "text/plain", f"request body over {MAX_BODY} bytes".encode())
            return None
        try:
            body = json.loads(self.rfile.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            body = None
        if not isinstance(body, dict):
            self.reply(400, "text/plain", b"the body must be a JSON object")
            return None
        return body

    def send_common_headers(self, sid=None):
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        if sid is not None:
            self.send_header("Set-Cookie", f"{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict")

    def reply(self, code, content_type, data, sid=None):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_common_headers(sid)
        self.end_headers()
        self.wfile.write(data)


def serve(model, tok, settings, system, host, port):
    try:
        if not 0 <= port <= 65535:
            raise OSError("the port must be in [0, 65535]")
        server = ChatServer((host, port), model, tok, settings, system)
    except OSError as e:  # in use, not permitted, or an address this machine does not have
        print(f"error: cannot serve on --host {host} --port {port}: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(2) from None
    host, port = server.server_address[:2]
    print(f"Wyrd web chat on http://{host}:{port}/  (Ctrl-C stops the server)", file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"warning: listening on {host}: anyone who can reach this address can use the chat",
              file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ---------------------------------------------------------------------------
# The command line


def load_checkpoint(path, quantize=None):
    """-> (model, tok), or raise SystemExit with one line a user can act on."""
    if not os.path.exists(path):
        if path == DEFAULT_CHECKPOINT:
            raise SystemExit(f"no checkpoint at {path}: make one with `python train.py` "
                             "(about 11 minutes on 2 cores), or pass --checkpoint PATH")
        raise SystemExit(f"no checkpoint at {path}")
    try:
        model, tok, _ = wyrd.load(path, quantize=quantize)
    except ValueError as e:  # CheckpointError, TokenizerError
        raise SystemExit(f"error: {e}") from None
    if tok is None:
        raise SystemExit(f"error: {path} holds no tokenizer; save it with wyrd.save(path, model, tokenizer)")
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
                   "saved with wyrd.save(dtype='int8')")
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


def main(argv=None):
    args = parse_args(argv)
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
            serve(model, tok, args.settings, args.system, args.host, args.port)
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
    except KeyboardInterrupt:  # outside a reply (a reply handles its own Ctrl-C)
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `python chat.py ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
