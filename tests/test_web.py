"""web.py's chat server, with a nano model built here: in a real browser
(headless Chromium driven by selenium against 127.0.0.1), then on loopback with
http.client alone. Chromium and its driver are Debian packages (.ci/run installs
them); without them the browser tests fail."""
import http.client
import json
import os
import select
import shutil
import threading
import time

os.environ["SE_AVOID_STATS"] = "true"  # selenium must not reach the internet
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import pytest  # noqa: E402

import chat  # noqa: E402
import conversation  # noqa: E402
import sampling  # noqa: E402
import web  # noqa: E402
from test_chat import ROOT, TEXTS, babbler  # noqa: E402  (the nano model that never ends a reply)
from tokenizer import Tokenizer  # noqa: E402

import numpy as np  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=320)


@pytest.fixture(scope="module")
def server(tok):
    srv = web.ChatServer(("127.0.0.1", 0), babbler(tok), tok, sampling.Settings(temperature=0, max_tokens=40))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1000,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                              options=options)
    yield driver
    driver.quit()


def url(srv):
    return "http://127.0.0.1:%d/" % srv.server_address[1]


def wait(driver, condition, seconds=30):
    return WebDriverWait(driver, seconds, poll_frequency=0.05).until(lambda d: condition())


def the_session(srv):
    """The conversation the page has (its first message started it)."""
    assert len(srv.sessions) >= 1
    return next(reversed(srv.sessions.values()))


def open_page(driver, srv):
    driver.get(url(srv))
    driver.execute_script("localStorage.clear()")
    driver.delete_all_cookies()                                      # a new browser: a new conversation
    driver.refresh()
    wait(driver, lambda: driver.execute_script("return document.body.dataset.ready") == "true")
    wait(driver, lambda: driver.execute_script("return document.activeElement.id") == "box")


def said_alone(model, tok, texts, **settings):
    """A fresh conversation that heard `texts`: what the server's should equal, transcript aside."""
    conv = conversation.Conversation(model, tok)
    for text in texts:
        conv.reply(text, sampling.Settings(**settings), np.random.default_rng(0))
    return conv


def el(driver, id_):
    return driver.find_element(By.ID, id_)


def set_field(driver, id_, value):
    if not el(driver, "panel").get_attribute("open"):
        el(driver, "panel").find_element(By.TAG_NAME, "summary").click()
    box = el(driver, id_)
    box.clear()
    box.send_keys(str(value))
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", box)


def send(driver, text):
    box = el(driver, "box")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def replies(driver):
    """The replies as the page holds them (textContent: selenium's .text folds whitespace)."""
    return driver.execute_script("return [...document.querySelectorAll('.msg.bot')].map((e) => e.textContent)")


def finished(driver):
    return el(driver, "send").is_enabled() and not el(driver, "stop").is_enabled()


def test_a_message_streams_a_reply_with_the_settings_of_the_page(browser, server, tok):
    open_page(browser, server)
    set_field(browser, "max_tokens", 5)
    box = el(browser, "box")
    box.send_keys("line one")
    box.send_keys(Keys.SHIFT, Keys.ENTER)                            # a new line, not a send
    box.send_keys("line two")
    assert replies(browser) == []
    box.send_keys(Keys.ENTER)
    wait(browser, lambda: replies(browser) and finished(browser))
    user = browser.execute_script("return document.querySelector('.msg.user').textContent")
    assert user == "line one\nline two"
    # greedy, at most 5 tokens: exactly what a fresh conversation with those settings says
    alone = said_alone(server.model.model, tok, ["line one\nline two"], temperature=0, max_tokens=5)
    assert replies(browser) == [alone.messages[-1]["content"]]
    conv = the_session(server).conv
    assert conv.messages is None and conv.state.pos == alone.state.pos   # no transcript; the same state
    assert browser.execute_script("return document.activeElement.id") == "box"
    assert browser.execute_script("return localStorage.getItem('wyrd.max_tokens')") == '"5"'


def test_stop_ends_the_reply_in_the_browser_and_on_the_server(browser, server, tok):
    open_page(browser, server)
    set_field(browser, "max_tokens", 20_000)
    set_field(browser, "temperature", 1)
    send(browser, "Tell me a story")
    wait(browser, lambda: len((replies(browser) or [""])[-1]) > 20)
    el(browser, "stop").click()
    wait(browser, lambda: finished(browser))
    session = the_session(server)
    wait(browser, lambda: not session.lock.locked())                # the server has closed the turn
    shown = replies(browser)[-1]
    pos = session.conv.state.pos
    time.sleep(0.5)
    assert session.conv.state.pos == pos                              # and generates nothing more
    assert shown and pos < 5_000                                      # far short of max_tokens
    assert "stopped" in browser.find_element(By.CSS_SELECTOR, ".msg.bot").get_attribute("class")
    set_field(browser, "max_tokens", 3)
    send(browser, "And then?")                                       # the conversation goes on
    wait(browser, lambda: len(replies(browser)) == 2 and finished(browser), 60)
    assert session.conv.state.pos > pos and the_session(server) is session


def test_new_chat_starts_over_with_the_system_prompt_of_the_page(browser, server):
    open_page(browser, server)
    set_field(browser, "max_tokens", 3)
    send(browser, "Hello")
    wait(browser, lambda: replies(browser) and finished(browser))
    session = the_session(server)
    assert session.conv.state.pos > 0
    set_field(browser, "system", "You are a pirate.")
    el(browser, "new").click()
    wait(browser, lambda: session.conv.system == "You are a pirate." and session.conv.state.pos == 0)
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, ".msg") == [])  # once the reply to reset arrives


def test_a_bad_setting_is_refused_with_the_servers_message(browser, server):
    open_page(browser, server)
    n = len(server.sessions)
    set_field(browser, "top_p", 5)
    send(browser, "Hello")
    wait(browser, lambda: el(browser, "status").text)
    assert el(browser, "status").text == "The server says: top_p must be in (0, 1] (1 = off), got 5.0"
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []      # nothing was said
    assert el(browser, "box").get_attribute("value") == "Hello"       # the text is given back
    assert len(server.sessions) == n                                  # and no conversation was started


def test_read_aloud_speaks_each_finished_reply_when_on_and_is_remembered(browser, server):
    open_page(browser, server)
    stub = "window.spoken = []; speechSynthesis.speak = (u) => window.spoken.push([u.text, u.rate]);"
    browser.execute_script(stub)
    set_field(browser, "max_tokens", 3)
    send(browser, "Hello")
    wait(browser, lambda: replies(browser) and finished(browser))
    assert browser.execute_script("return window.spoken") == []       # off by default
    el(browser, "aloud").click()
    set_field(browser, "rate", 1.5)
    send(browser, "Again")
    wait(browser, lambda: len(replies(browser)) == 2 and finished(browser))
    assert browser.execute_script("return window.spoken") == [[replies(browser)[-1], 1.5]]
    browser.refresh()
    wait(browser, lambda: browser.execute_script("return document.readyState") == "complete")
    assert el(browser, "aloud").is_selected()


def test_phone_width_keyboard_and_a_server_that_is_gone(browser, server, tok):
    browser.set_window_size(375, 700)
    try:
        open_page(browser, server)
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        # keyboard only: Tab reaches every control of the form from the message box
        reached = set()
        for _ in range(6):
            browser.switch_to.active_element.send_keys(Keys.TAB)
            reached.add(browser.execute_script("return document.activeElement.id"))
        assert {"send", "new"} <= reached, reached
    finally:
        browser.set_window_size(1000, 800)
    # the server goes away: the page says so
    gone = web.ChatServer(("127.0.0.1", 0), server.model.model, tok, sampling.Settings(max_tokens=3))
    threading.Thread(target=gone.serve_forever, daemon=True).start()
    open_page(browser, gone)
    gone.shutdown()
    gone.server_close()
    send(browser, "Anyone there?")
    wait(browser, lambda: "Cannot reach the server" in el(browser, "status").text)
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []      # nothing was said
    assert el(browser, "box").get_attribute("value") == "Anyone there?"


def test_the_page_runs_only_its_own_script():
    srv = web.ChatServer(("127.0.0.1", 0), None, Tokenizer.train(TEXTS, vocab_size=300), sampling.Settings())
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
        conn.request("GET", "/")
        r = conn.getresponse()
        page = r.read().decode()
        csp = r.getheader("Content-Security-Policy")
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
        assert '<script src="/app.js"' in page and "<script>" not in page and "<style>" not in page
        conn.request("GET", "/api/settings")
        settings = json.loads(conn.getresponse().read())
        assert settings == {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "max_tokens": 512,
                            "system": chat.DEFAULT_SYSTEM}
    finally:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------------------
# The server on loopback, without a browser


@pytest.fixture
def new_server(tok):
    """A server of its own for each test, so each starts with no sessions."""
    srv = web.ChatServer(("127.0.0.1", 0), babbler(tok), tok, sampling.Settings(temperature=0, max_tokens=6))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def post(srv, path, body, cookie=None, content_type="application/json", headers=None):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Content-Type": content_type, **({"Cookie": cookie} if cookie else {}), **(headers or {})}
    conn.request("POST", path, data, h)
    r = conn.getresponse()
    out = r.status, r.read(), r.getheader("Set-Cookie")
    conn.close()
    return out


def ask(srv, text, cookie=None):
    status, body, set_cookie = post(srv, "/api/chat", {"message": text}, cookie)
    assert status == 200, body
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert lines[-1] == {"done": True}
    return "".join(m.get("text", "") for m in lines), set_cookie.split(";")[0]


def test_web_page_and_streamed_replies_per_session(new_server, tok):
    conn = http.client.HTTPConnection(*new_server.server_address[:2], timeout=30)
    conn.request("GET", "/app.js")
    r = conn.getresponse()
    assert r.status == 200 and b"/api/chat" in r.read()
    conn.close()
    reply, cookie = ask(new_server, "Hello!")
    again, cookie2 = ask(new_server, "And then?", cookie)
    assert cookie2 == cookie and len(new_server.sessions) == 1
    sid = cookie.split("=")[1]
    alone = said_alone(new_server.model.model, tok, ["Hello!", "And then?"], temperature=0, max_tokens=6)
    assert [m["content"] for m in alone.messages[1:]] == ["Hello!", reply, "And then?", again]
    assert new_server.sessions[sid].conv.state.pos == alone.state.pos
    other, cookie3 = ask(new_server, "Hello!")                        # a new browser: a new conversation
    assert cookie3 != cookie and other == reply
    assert post(new_server, "/api/reset", {}, cookie)[0] == 200
    assert new_server.sessions[sid].conv.state.pos == 0


def test_web_answers_only_its_own_host_names(new_server, capfd):
    port = new_server.server_address[1]
    for host, status in [("evil.example", 421), (f"evil.example:{port}", 421), (f"localhost:{port}", 200),
                         (f"127.0.0.1:{port}", 200), ("[::1]", 200)]:
        conn = http.client.HTTPConnection(*new_server.server_address[:2], timeout=30)
        conn.request("GET", "/", headers={"Host": host})
        assert conn.getresponse().status == status, host
        conn.close()
    assert post(new_server, "/api/chat", {"message": "hi"}, headers={"Host": "evil.example"})[0] == 421
    capfd.readouterr()
    for error in (BrokenPipeError(), ConnectionResetError()):   # a client that left: nothing in the log
        try:
            raise error
        except OSError:
            new_server.handle_error(None, ("127.0.0.1", 1))
    assert capfd.readouterr().err == ""
    try:
        raise ValueError("a real bug")
    except ValueError:
        new_server.handle_error(None, ("127.0.0.1", 1))
    assert "a real bug" in capfd.readouterr().err


def test_web_rejects_bad_requests(new_server):
    conn = http.client.HTTPConnection(*new_server.server_address[:2], timeout=30)
    conn.putrequest("POST", "/api/chat")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10 ** 9))             # announced, never sent
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    conn = http.client.HTTPConnection(*new_server.server_address[:2], timeout=10)
    conn.putrequest("POST", "/api/chat")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", "-1")                      # would read until the client closes
    conn.endheaders()
    assert conn.getresponse().status == 400                     # at once, with the connection still open
    conn.close()
    assert post(new_server, "/api/chat", {"message": "x" * 100_000})[0] == 413
    assert post(new_server, "/api/chat", {"message": "hi"}, content_type="text/plain")[0] == 415
    assert post(new_server, "/api/chat", b"{not json")[0] == 400
    assert post(new_server, "/api/chat", b"[" * 10_000 + b"]" * 10_000)[0] == 400     # nested too deeply
    assert post(new_server, "/api/chat", {"text": "hi"})[0] == 400
    # the page's settings are checked as the command line checks them
    for settings, says in [({"temperature": "hot"}, b'temperature must be a number, got "hot"'),
                           ({"top_k": 2.5}, b"top_k must be an integer, got 2.5"),
                           ({"top_p": 0}, b"top_p must be in (0, 1] (1 = off), got 0.0"),
                           ({"max_tokens": 0}, b"max_tokens must be an integer in [1, 1048576], got 0"),
                           ({"seed": 1}, b"unknown setting 'seed'"), ([1], b"settings must be a JSON object")]:
        status, body, _ = post(new_server, "/api/chat", {"message": "hi", "settings": settings})
        assert status == 400 and body.startswith(says), body
    assert post(new_server, "/api/reset", {"system": 5})[:2] == (400, b"system must be a string")
    assert post(new_server, "/api/nothing", {})[0] == 404
    _, cookie = ask(new_server, "Hello")
    session = new_server.sessions[cookie.split("=")[1]]
    with session.lock:                                             # a reply still being written
        assert post(new_server, "/api/chat", {"message": "hi"}, cookie)[0] == 409
    assert new_server.server_address[0] == "127.0.0.1"


def test_concurrent_conversations_do_not_share_state(new_server, tok):
    questions = ["Hello!", "Tell me a story.", "Thanks"]
    replies, errors = {}, []

    def user(name):
        try:
            cookie, said = None, []
            for q in questions if name % 2 else questions[::-1]:
                reply, cookie = ask(new_server, q, cookie)
                said.append(reply)
            replies[name] = (cookie, said)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)
    threads = [threading.Thread(target=user, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    # each conversation equals the same questions asked alone (greedy decoding)
    for name, (cookie, said) in replies.items():
        alone = conversation.Conversation(babbler(tok), tok)
        expect = [alone.reply(q, new_server.settings, np.random.default_rng(0))
                  for q in (questions if name % 2 else questions[::-1])]
        assert said == expect
        state = new_server.sessions[cookie.split("=")[1]].conv.state
        assert state.pos == alone.state.pos
        for a, b in zip(state.layers, alone.state.layers):
            for key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)


def get(srv, path):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    out = r.status, r.read(), r.headers
    conn.close()
    return out


def test_the_page_is_its_files_on_disk_and_no_other_path_is_served(new_server, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)                                    # found beside web.py, not in the CWD
    for path, name, kind in [("/", "index.html", "text/html"), ("/app.css", "app.css", "text/css"),
                             ("/app.js", "app.js", "text/javascript")]:
        status, body, headers = get(new_server, path)
        with open(os.path.join(ROOT, "web", name), "rb") as f:
            assert status == 200 and body == f.read(), path
        assert headers["Content-Type"] == kind + "; charset=utf-8"
        assert headers["Content-Security-Policy"] == web.CSP and headers["X-Content-Type-Options"] == "nosniff"
    for path in ["/web/../chat.py", "/app.js/../../README.md", "/../chat.py", "/%2e%2e/chat.py", "/web/app.js",
                 "/index.html", "/./app.js", "/app.js/", "/chat.py", "/web.py", "//etc/passwd", "/web/"]:
        assert get(new_server, path)[:2] == (404, b"not found"), path


# ---------------------------------------------------------------------------
# What a client can make the server hold: all of it bounded


def raw_request(srv, data, source="127.0.0.1", timeout=10):
    """Send bytes as they are; -> the whole reply (the server closes after one request)."""
    import socket
    with socket.create_connection(srv.server_address[:2], timeout=timeout, source_address=(source, 0)) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_a_number_json_cannot_convert_is_a_400_not_a_traceback(new_server, capfd):
    for body, says in [(b'{"message": "hi", "settings": {"top_k": ' + b"1" * 5000 + b"}}",
                        b"the body is not valid JSON: an integer of 5,000 digits (at most 100)"),
                       (b'{"message": "hi", "n": -' + b"9" * 101 + b"}", b"an integer of 101 digits"),
                       (b'{"message": "hi", "settings": {"top_k": 1e999}}', b"top_k must be an integer, got Infinity"),
                       (b'{"message": "hi", "settings": {"temperature": NaN}}', b"temperature must be"),
                       (b'{"message": "\xff"}', b"the body is not valid JSON: 'utf-8' codec can't decode"),
                       (b'{"message": "hi"', b"the body is not valid JSON: Expecting"),
                       (b"[" * 100_000, b"request body over")]:
        status, reply, _ = post(new_server, "/api/chat", body)
        assert status in (400, 413) and says in reply, (body[:60], status, reply)
    assert "Traceback" not in capfd.readouterr().err


def test_conversations_keep_no_transcript_and_texts_are_capped_in_bytes(new_server):
    _, cookie = ask(new_server, "Hello")
    for _ in range(3):
        ask(new_server, "x" * 1000, cookie)
    conv = new_server.sessions[cookie.split("=")[1]].conv
    assert conv.messages is None                                    # nothing kept that grows with the chat
    euro = "\u20ac" * (web.MAX_TEXT // 3) + "a" * (web.MAX_TEXT % 3)  # 3 bytes of UTF-8 each: at the limit
    assert post(new_server, "/api/chat", {"message": euro, "settings": {"max_tokens": 1}}, cookie)[0] == 200
    for body in ({"message": euro + "a"}, {"message": "hi", "system": euro + "a"},
                 {"message": "\ud800" * (web.MAX_TEXT // 3 + 1)}):   # lone surrogates count as 3 bytes too
        status, reply, _ = post(new_server, "/api/chat", body, cookie)
        assert status == 413 and reply.endswith(b"over %d bytes of UTF-8" % web.MAX_TEXT), reply
    assert post(new_server, "/api/reset", {"system": euro + "a"}, cookie)[0] == 413


def test_requests_handled_at_once_are_capped_and_the_rest_get_503(tok, monkeypatch):
    import socket
    monkeypatch.setattr(web, "MAX_HANDLERS", 4)
    srv = web.ChatServer(("127.0.0.1", 0), babbler(tok), tok, sampling.Settings(temperature=0, max_tokens=3))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    held = []
    try:
        before = threading.active_count()
        for _ in range(4):                                          # each holds a handler, headers unfinished
            s = socket.create_connection(srv.server_address[:2], timeout=10)
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            held.append(s)
        time.sleep(0.3)
        for _ in range(20):
            reply = raw_request(srv, b"GET /api/settings HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert reply.startswith(b"HTTP/1.0 503 ") and reply.endswith(web.BUSY_TEXT), reply
        assert threading.active_count() <= before + 4
        for s in held:
            s.close()
        deadline = time.time() + 10
        while time.time() < deadline and not get(srv, "/api/settings")[0] == 200:
            time.sleep(0.05)
        assert get(srv, "/api/settings")[0] == 200                  # free again once they left
    finally:
        for s in held:
            s.close()
        srv.shutdown()
        srv.server_close()


def test_a_request_trickled_byte_by_byte_ends_at_the_deadline(new_server, monkeypatch):
    """The socket's timeout starts again at each recv: one byte every 0.2 s kept a
    handler for as long as the client liked (100 headers x 60 s)."""
    import socket
    monkeypatch.setattr(web, "REQUEST_SECONDS", 1.0)
    body = json.dumps({"message": "hi"}).encode()
    for head, rest in [(b"", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: 1\r\n" * 30),   # headers
                       (b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % (len(body) + 50), body + b" " * 50)]:     # body
        with socket.create_connection(new_server.server_address[:2], timeout=10) as s:
            s.sendall(head)
            start, reply = time.time(), b""
            for byte in rest:
                try:
                    s.sendall(bytes([byte]))
                except OSError:                                     # closed by the server
                    break
                if select.select([s], [], [], 0.2)[0]:
                    reply = s.recv(65536)
                    break
                assert time.time() - start < 3, "still reading after 3 s"
            assert time.time() - start < 2
            assert not reply or reply.startswith(b"HTTP/1.0 408 "), reply
    assert get(new_server, "/api/settings")[0] == 200


def test_cookieless_requests_cannot_evict_conversations_in_use(new_server, monkeypatch):
    """64 /api/reset without a cookie made 64 conversations and evicted everyone's.
    Now a reset without a known cookie makes nothing, and a new conversation replaces
    only an idle one: its client's when it holds its share, else the least recently used."""
    monkeypatch.setattr(web, "MAX_SESSIONS", 6)
    monkeypatch.setattr(web, "MAX_SESSIONS_PER_CLIENT", 3)
    _, mine = ask(new_server, "Hello")
    for cookie in (None, "wyrd_session=0123", "wyrd_session=" + "f" * 4000, "a=b; wyrd_session", '"x\x7f', ";;;=;"):
        for _ in range(20):
            status, _, set_cookie = post(new_server, "/api/reset", {}, cookie)
            assert status == 200 and set_cookie is None
    assert list(new_server.sessions) == [mine.split("=")[1]]
    # cookie-less chats from this address: two more fit its share of 3, then 429
    flood = {"message": "hi", "settings": {"max_tokens": 1}}
    assert [post(new_server, "/api/chat", flood, "wyrd_session=nosuch")[0] for _ in range(4)] == [200, 200, 429, 429]
    # from two other loopback addresses: 3 more fill the server, then 503
    codes = [raw_request(new_server, b"POST /api/chat HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n%s" % (len(json.dumps(flood)), json.dumps(flood).encode()),
                         source=source)[9:12] for source in ["127.0.0.2"] * 3 + ["127.0.0.3"] * 2]
    assert codes == [b"200", b"200", b"200", b"503", b"503"]
    assert len(new_server.sessions) == 6 and mine.split("=")[1] in new_server.sessions
    ask(new_server, "Still there?", mine)                           # the conversation in use goes on
    # once idle, the least recently used gives way: this address's own first
    for s in new_server.sessions.values():
        s.used -= web.IDLE_SECONDS
    ask(new_server, "Still there?", mine)
    assert post(new_server, "/api/chat", flood)[0] == 200
    assert len(new_server.sessions) == 6 and mine.split("=")[1] in new_server.sessions


def test_odd_headers_are_refused_or_read_strictly(new_server):
    ok = json.dumps({"message": "hi", "settings": {"max_tokens": 1}}).encode()

    def send(headers, body=ok):
        return raw_request(new_server, b"POST /api/chat HTTP/1.0\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n" + body)
    assert send(b"Content-Type: Application/JSON; charset=utf-8\r\nContent-Length: %d\r\n" % len(ok)).startswith(
        b"HTTP/1.0 200 ")                                           # media types are case-insensitive
    for headers, status in [(b"Content-Type: application/json\r\n", b"411"),
                            (b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n", b"400"),
                            (b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nContent-Length: %d\r\n"
                             % len(ok), b"400"),
                            (b"Host: evil.example\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                             % len(ok), b"400"),                   # a second Host header
                            (b"Content-Type: application/json\r\nContent-Length: +%d\r\n" % len(ok), b"400"),
                            (b"Content-Type: application/json\r\nContent-Length: 1_0\r\n", b"400"),
                            (b"Content-Type: application/json\r\nContent-Length: %d\r\nContent-Length: 3\r\n"
                             % len(ok), b"400"),
                            (b"Content-Type: application/json\r\nContent-Length: " + b"9" * 5000 + b"\r\n", b"400"),
                            (b"Content-Type: application/json\r\nContent-Length: \xb2\r\n", b"400"),
                            (b"Content-Type: text/plain\r\nContent-Length: %d\r\n" % len(ok), b"415"),
                            (b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: %d\r\n" % len(ok), b"415"),
                            (b"Content-Type: application/json\r\nContent-Length: %d\r\nCookie: " % len(ok)
                             + b"x" * 70_000 + b"\r\n", b"431"),
                            (b"X: y\r\n" * 101, b"431")]:
        reply = send(headers)
        assert reply[9:12] == status, (headers[:80], reply[:80])
    assert get(new_server, "/api/settings")[0] == 200


def test_fifty_slow_clients_leave_the_server_fast(new_server):
    import socket
    held = []
    try:
        for _ in range(50):                                          # under MAX_HANDLERS: each holds a handler
            s = socket.create_connection(new_server.server_address[:2], timeout=10)
            s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            held.append(s)
        start = time.time()
        reply, _ = ask(new_server, "Hello")
        assert reply and get(new_server, "/")[0] == 200 and time.time() - start < 2
    finally:
        for s in held:
            s.close()
