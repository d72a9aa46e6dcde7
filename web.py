"""The local web chat that `python chat.py --serve` runs: one page, its replies
streamed from the same Conversation as the REPL's.

GET / serves the page (web/index.html, web/app.css, web/app.js beside this file),
GET /api/settings gives the server's defaults, POST /api/chat streams a reply as
JSON lines, POST /api/reset starts over. Each browser has its own conversation,
named by a cookie. Standard library only; the page runs only its own script (CSP).

Everything a client can make the server hold is bounded: the bytes of a request and
of the texts in it, the time to send a request, the requests handled at once, and the
conversations, in all and per client address (the constants below).
"""
from conversation import Conversation

import contextlib
import dataclasses
import http.cookies
import io
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from tokenizer import DEFAULT_SYSTEM

MAX_BODY = 64 * 1024     # bytes of request body, else 413
MAX_TEXT = 8 * 1024      # bytes of UTF-8 in a message or a system prompt, else 413: what one request
                         # can add to the tokenizer's cache (the model's window is 128-512 tokens anyway)
MAX_SESSIONS = 64        # conversations kept, else 503
MAX_SESSIONS_PER_CLIENT = 16  # of them from one client address (IP), else 429
IDLE_SECONDS = 600       # past a bound, a new conversation replaces the least recently used one only if
                         # idle this long: a flood can refuse newcomers, never end a conversation in use
MAX_INT_DIGITS = 100     # in a JSON integer of a request
MAX_HANDLERS = 64        # requests handled at once; the next connection gets 503 at once
REQUEST_SECONDS = 10     # to send the request line, headers and body, however slowly they trickle
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
    def __init__(self, conv, rng, client):
        self.conv, self.rng, self.client, self.lock = conv, rng, client, threading.Lock()
        self.used = time.monotonic()   # when a request last named it


class Full(Exception):
    """No room for another conversation: `status` and a message for the client."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


BUSY_TEXT = b"the server is busy; try again in a moment"
BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(BUSY_TEXT), BUSY_TEXT))


class DeadlineReader(io.RawIOBase):
    """A socket's input that ends in TimeoutError at `deadline` (time.monotonic()): a
    socket's own timeout starts again at each recv, so a client sending a byte every
    59 s would hold a thread for as long as it liked."""

    def __init__(self, sock, deadline, timeout):
        self.sock, self.deadline, self.timeout = sock, deadline, timeout

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the request took over {REQUEST_SECONDS} s to arrive")
        self.sock.settimeout(min(left, self.timeout))
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.timeout)  # for the reply's writes


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # connections waiting to be accepted (socketserver's 5 drops bursts)

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
        self.handlers = threading.BoundedSemaphore(MAX_HANDLERS)

    def process_request(self, request, client_address):
        if not self.handlers.acquire(blocking=False):
            return self.refuse(request)
        try:
            super().process_request(request, client_address)  # a thread, which releases the slot
        except BaseException:
            self.handlers.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.handlers.release()

    def refuse(self, request):
        """503 from the accepting thread, without a thread of its own: the request is read
        for up to 0.1 s first, as a socket closed with unread data resets the connection
        and the client might see the reset rather than the reply."""
        try:
            request.settimeout(0.1)
            with contextlib.suppress(OSError):
                request.recv(MAX_BODY)
            request.sendall(BUSY)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            request.close()

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # a client that left or stalled is not an error

    def session(self, sid, client, system=None):
        """-> (session id, WebSession): the one `sid` names, else a new one started with
        `system` (if given) when there is room; raises Full when there is none."""
        with self.sessions_lock:
            now = time.monotonic()
            if sid in self.sessions:
                self.sessions.move_to_end(sid)
                self.sessions[sid].used = now
                return sid, self.sessions[sid]
            self.make_room(client, now)
            sid = secrets.token_hex(16)
            conv = Conversation(self.model, self.tok, self.system if system is None else system, transcript=False)
            self.sessions[sid] = WebSession(conv, np.random.default_rng(self.settings.seed), client)
            return sid, self.sessions[sid]

    def make_room(self, client, now):
        """Drop the least recently used conversation, of this client if it holds its share,
        when a new one would pass a bound; only an idle one, so that a flood of new
        conversations can refuse newcomers but never end conversations in use."""
        mine = [sid for sid, s in self.sessions.items() if s.client == client]
        if len(mine) >= MAX_SESSIONS_PER_CLIENT:
            candidates, full = mine, Full(429, f"your address already has {MAX_SESSIONS_PER_CLIENT} "
                                               "conversations in use; try again later")
        elif len(self.sessions) >= MAX_SESSIONS:
            candidates, full = list(self.sessions), Full(503, f"the server already has {MAX_SESSIONS} "
                                                              "conversations in use; try again later")
        else:
            return
        for sid in candidates:  # least recently used first
            s = self.sessions[sid]
            if now - s.used >= IDLE_SECONDS and not s.lock.locked():
                del self.sessions[sid]
                return
        raise full


def parse_int(text):
    """A JSON integer; Python's own limit (4,300 digits) would raise a ValueError that
    names sys.set_int_max_str_digits, and no setting needs more than a few digits."""
    if len(text) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-')):,} digits (at most {MAX_INT_DIGITS})")
    return int(text)


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
    timeout = 60  # seconds a write may wait for the client to read; reads end sooner, at the deadline

    def setup(self):
        super().setup()
        self.rfile.close()  # the socket's own reader, replaced by one with an overall deadline
        self.rfile = io.BufferedReader(DeadlineReader(self.connection, time.monotonic() + REQUEST_SECONDS,
                                                      self.timeout))

    def host_refused(self):
        """Answer 421 to a Host header that is not one of the server's names (400 to two:
        a proxy in front might read the other one)."""
        if len(self.headers.get_all("Host") or []) > 1:
            self.close_connection = True
            self.reply(400, "text/plain", b"more than one Host header")
            return True
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
        for name, text in (("message", message), ("system", system)):
            if isinstance(text, str) and len(text.encode("utf-8", "surrogatepass")) > MAX_TEXT:
                return self.reply(413, "text/plain", f"{name} over {MAX_TEXT} bytes of UTF-8".encode())
        try:
            settings = web_settings(self.server.settings, body.get("settings", {}))
        except ValueError as e:
            return self.reply(400, "text/plain", str(e).encode())
        try:
            cookie = http.cookies.SimpleCookie(self.headers.get("Cookie", ""))
        except http.cookies.CookieError:
            cookie = {}
        sid = cookie[COOKIE].value if COOKIE in cookie else None
        if self.path == "/api/reset" and sid not in self.server.sessions:
            # nothing to reset: the first message starts the conversation (with the page's
            # system prompt), so a flood of resets creates nothing
            return self.reply(200, "application/json", b'{"ok": true}')
        try:  # a chat's system prompt is used only when the chat starts a conversation
            sid, session = self.server.session(sid, self.client_address[0], system)
        except Full as e:
            return self.reply(e.status, "text/plain", str(e).encode())
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
            except (ConnectionError, TimeoutError):
                pass                    # the reader left (Stop, or gone) or stopped reading: the reply ends here
            finally:
                pieces.close()
        finally:
            session.used = time.monotonic()
            session.lock.release()

    def read_json(self):
        """The request body as a JSON object, or None after sending the error."""
        if self.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
            # also makes a cross-site form post impossible without a CORS preflight we never grant
            self.reply(415, "text/plain", b"send Content-Type: application/json")
            return None
        if "Transfer-Encoding" in self.headers:  # chunked or not, the body is read by Content-Length only
            self.close_connection = True
            self.reply(400, "text/plain", b"Transfer-Encoding is not supported: send Content-Length")
            return None
        lengths = self.headers.get_all("Content-Length") or []
        if len(set(lengths)) != 1 or not re.fullmatch(r"[0-9]{1,15}", lengths[0].strip()):
            self.close_connection = True  # -1, +5, 5_0 or two lengths: no guess at where the body ends
            self.reply(411 if not lengths else 400, "text/plain",
                       b"Content-Length required" if not lengths else b"Content-Length must be one number >= 0")
            return None
        length = int(lengths[0])
        if length > MAX_BODY:
            if length <= 16 * MAX_BODY:  # drop it, so the client reads the 413 rather than a reset
                with contextlib.suppress(TimeoutError):
                    self.rfile.read(length)
            self.close_connection = True
            self.reply(413, "text/plain", f"request body over {MAX_BODY} bytes".encode())
            return None
        try:
            data = self.rfile.read(length)
        except TimeoutError as e:
            self.close_connection = True
            self.reply(408, "text/plain", str(e).encode())
            return None
        try:
            body = json.loads(data.decode("utf-8"), parse_int=parse_int)
        except RecursionError:
            return self.reply(400, "text/plain", b"the body is not valid JSON: nested too deeply")
        except ValueError as e:  # not UTF-8, not JSON, or parse_int's
            return self.reply(400, "text/plain", f"the body is not valid JSON: {e}".encode())
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

