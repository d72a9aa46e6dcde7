"""The local web chat that `python chat.py --serve` runs: one page, its replies
streamed from the same Conversation as the REPL's.

GET / serves the page (web/index.html, web/app.css, web/app.js beside this file),
GET /api/settings gives the server's defaults, POST /api/chat streams a reply as
JSON lines, POST /api/reset starts over. Each browser has its own conversation,
named by a cookie. Standard library only; the page runs only its own script (CSP).
"""
from chat import Conversation  # first: chat sets the thread policy before NumPy loads

import dataclasses
import http.cookies
import json
import os
import secrets
import sys
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from tokenizer import DEFAULT_SYSTEM

MAX_BODY = 64 * 1024     # bytes of request body, else 413
MAX_SESSIONS = 64        # conversations kept; the least recently used goes first
COOKIE = "wyrd_session"
WEB_SETTINGS = {"temperature": float, "top_k": int, "top_p": float, "max_tokens": int}  # what the page may set
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")  # beside this file, whatever the CWD
# the only files served, by request path: a path is looked up here, never joined to PAGE_DIR
PAGE_FILES = {"/": ("index.html", "text/html"), "/app.css": ("app.css", "text/css"),
              "/app.js": ("app.js", "text/javascript")}


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
        if path not in PAGE_FILES:
            return self.reply(404, "text/plain", b"not found")
        name, kind = PAGE_FILES[path]
        with open(os.path.join(PAGE_DIR, name), "rb") as f:  # read per request: an edited page shows on reload
            self.reply(200, kind + "; charset=utf-8", f.read())

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

