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
    // the system prompt counts only if this message starts the conversation on the server
    const r = await post("/api/chat", {message: text, settings: settings(), system: $("system").value},
                         controller.signal);
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
  document.body.dataset.ready = "true";     // for whoever drives the page: the New chat has been answered
}
start();
