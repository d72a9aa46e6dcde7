"""The web chat in a real browser: headless Chromium driven by selenium against
chat.py's server on 127.0.0.1, with a nano model built here. Chromium and its
driver are Debian packages (.ci/run installs them); without them this fails."""
import http.client
import json
import os
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
import sampling  # noqa: E402
from test_chat import TEXTS, babbler  # noqa: E402  (the nano model that never ends a reply)
from tokenizer import Tokenizer  # noqa: E402

import numpy as np  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=320)


@pytest.fixture(scope="module")
def server(tok):
    srv = chat.ChatServer(("127.0.0.1", 0), babbler(tok), tok, sampling.Settings(temperature=0, max_tokens=40))
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
    """The one conversation the page has (it starts a new one when it loads)."""
    assert len(srv.sessions) >= 1
    return next(reversed(srv.sessions.values()))


def open_page(driver, srv):
    driver.get(url(srv))
    driver.execute_script("localStorage.clear()")
    driver.delete_all_cookies()                                      # a new browser: a new conversation
    n = len(srv.sessions)
    driver.refresh()
    wait(driver, lambda: len(srv.sessions) > n)                     # the page's New chat reached the server
    wait(driver, lambda: driver.execute_script("return document.activeElement.id") == "box")


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
    expected = chat.Conversation(server.model.model, tok).reply("line one\nline two",
                                                                sampling.Settings(temperature=0, max_tokens=5),
                                                                np.random.default_rng(0))
    assert replies(browser) == [expected]
    assert the_session(server).conv.messages[1:] == [{"role": "user", "content": "line one\nline two"},
                                                     {"role": "assistant", "content": expected}]
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
    said = session.conv.messages[-1]
    pos = session.conv.state.pos
    time.sleep(0.5)
    assert session.conv.state.pos == pos                              # and generates nothing more
    assert said["role"] == "assistant" and said["content"].startswith(shown)
    assert len(tok.encode(said["content"])) < 5_000                  # far short of max_tokens
    assert "stopped" in browser.find_element(By.CSS_SELECTOR, ".msg.bot").get_attribute("class")
    send(browser, "And then?")                                       # the conversation goes on
    set_field(browser, "max_tokens", 3)
    wait(browser, lambda: len(session.conv.messages) == 5 and finished(browser), 60)


def test_new_chat_starts_over_with_the_system_prompt_of_the_page(browser, server):
    open_page(browser, server)
    set_field(browser, "max_tokens", 3)
    send(browser, "Hello")
    wait(browser, lambda: replies(browser) and finished(browser))
    session = the_session(server)
    assert len(session.conv.messages) == 3
    set_field(browser, "system", "You are a pirate.")
    el(browser, "new").click()
    wait(browser, lambda: session.conv.messages == [{"role": "system", "content": "You are a pirate."}])
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, ".msg") == [])  # once the reply to reset arrives


def test_a_bad_setting_is_refused_with_the_servers_message(browser, server):
    open_page(browser, server)
    set_field(browser, "top_p", 5)
    send(browser, "Hello")
    wait(browser, lambda: el(browser, "status").text)
    assert el(browser, "status").text == "The server says: top_p must be in (0, 1] (1 = off), got 5.0"
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []      # nothing was said
    assert el(browser, "box").get_attribute("value") == "Hello"       # the text is given back
    assert len(the_session(server).conv.messages) == 1


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
    gone = chat.ChatServer(("127.0.0.1", 0), server.model.model, tok, sampling.Settings(max_tokens=3))
    threading.Thread(target=gone.serve_forever, daemon=True).start()
    open_page(browser, gone)
    gone.shutdown()
    gone.server_close()
    send(browser, "Anyone there?")
    wait(browser, lambda: "Cannot reach the server" in el(browser, "status").text)
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []      # nothing was said
    assert el(browser, "box").get_attribute("value") == "Anyone there?"


def test_the_page_runs_only_its_own_script():
    srv = chat.ChatServer(("127.0.0.1", 0), None, Tokenizer.train(TEXTS, vocab_size=300), sampling.Settings())
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
