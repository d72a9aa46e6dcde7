"""Data: the built-in corpus, the real-data loaders, the token cache and batches."""
import wyrd  # noqa: F401

import gzip
import io
import json
import os
import re
import shutil
import tarfile

import numpy as np
import pytest

import corpus
import data
from tokenizer import Tokenizer

FIX = os.path.join(os.path.dirname(__file__), "fixtures")

TXT_STORIES = [
    "Once upon a time, there was a little cat named Tom. Tom liked to play.\nHe said, \"Let's go!\"",
    "Lily had a red ball.\n\nShe lost it, then she found it.",
    "Ben was sad.",
    "Ben was happy again.",
]
SHARD_STORIES = ["A dog named Spot ran to the park.",
                 "The frog jumped into the pond. \u201cSplash!\u201d said the frog."]
OASST_EN = [  # the hand-built trees of the fixtures, flattened by the rule
    [{"role": "user", "content": "What is a cat?"}, {"role": "assistant", "content": "A cat is a small furry pet."},
     {"role": "user", "content": "Do cats like milk?"},
     {"role": "assistant", "content": "Many cats like milk, but water is better for them."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me more."}, {"role": "assistant", "content": "More of what?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You're welcome!"}],
]


def fixture(name):
    return os.path.join(FIX, name)


def gzipped(tmp_path, name):
    dest = tmp_path / (name + ".gz")
    dest.write_bytes(gzip.compress(open(fixture(name), "rb").read()))
    return str(dest)


@pytest.fixture(scope="module")
def tok():
    texts = corpus.builtin_stories(200) + [f"{m['role']}\n{m['content']}" for c in corpus.builtin_chats(100) for m in c]
    return Tokenizer.train(texts, 400)


# ---------------------------------------------------------------------------- built-in corpus

def test_builtin_stories_are_seeded_distinct_and_varied():
    a = corpus.builtin_stories(3000, seed=0)
    assert a == corpus.builtin_stories(3000, seed=0)
    assert len(set(a)) == 3000
    b = corpus.builtin_stories(3000, seed=1)
    assert len(set(a) & set(b)) < 30          # another seed gives other stories
    # variety beyond recall: many distinct heroes, openings and plots
    heroes = {s.split(" named ")[1].split()[0].strip(".,") for s in a if " named " in s}
    assert len(heroes) > 60
    assert len({s.split("\n\n")[1][:40] for s in a}) > 500
    assert sum('"' in s for s in a) > 2900   # dialogue in quotes
    assert all(s.strip() == s and "{" not in s and "  " not in s for s in a)
    assert not [s for s in a if re.search(r"(^|[.!?] |\n)[a-z]", s)]   # sentences start with a capital


def test_builtin_chats_follow_chatml_roles_and_answer_about_the_story():
    chats = corpus.builtin_chats(600, seed=0)
    assert chats == corpus.builtin_chats(600, seed=0)
    kinds = {"greeting": 0, "story": 0, "identity": 0, "question": 0}
    for chat in chats:
        roles = [m["role"] for m in chat]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["user", "assistant"] * (len(body) // 2) and body
        assert all(isinstance(m["content"], str) and m["content"] for m in chat)
        for i, m in enumerate(chat):
            if m["role"] != "user":
                continue
            reply = chat[i + 1]["content"]
            asks = m["content"].startswith(("Tell me a story about a ", "Write a story about a "))
            if asks and "named" not in m["content"]:
                kind = m["content"].split(" about a ")[1].rstrip(".?")
                kind = kind.split(" ", 1)[1] if kind.startswith("lost ") else kind
                if kind in corpus._ANIMALS + corpus._TOYS + corpus._OBJECTS + ["girl", "boy"]:
                    assert kind in reply, (m, reply)
                    kinds["story"] += 1
            if m["content"].startswith("What is the name of the "):
                name = reply.rstrip(".").split()[-1]
                assert any(f"named {name}" in t["content"] for t in chat[:i])  # the story just told
                kinds["question"] += 1
            if m["content"] in ("Who are you?", "What is your name?"):
                assert "Wyrd" in reply
                kinds["identity"] += 1
            if m["content"] in ("Hi!", "Hello!"):
                kinds["greeting"] += 1
    assert min(kinds.values()) > 5, kinds
    systems = {c[0]["content"] for c in chats if c[0]["role"] == "system"}
    assert len(systems) >= 4 and corpus.DEFAULT_SYSTEM in systems
    assert any(c[0]["role"] != "system" for c in chats)


def test_the_skill_checks_are_held_out_and_score_the_corpus_own_replies():
    """skill_check's conversations share no story with the default run's training
    chats (builtin: 12,000 from seed 1), its OUTSIDE questions are never asked by the
    corpus, and its scorers pass the corpus's own replies and fail wrong ones."""
    topic, recall = corpus.topic_cases(40), corpus.recall_cases(40)
    trained = {m["content"] for chat in data.builtin_documents("builtin", chat=True) for m in chat}
    assert not {reply for _, _, reply in topic} & trained
    assert not {messages[2]["content"] for messages, _ in recall} & trained
    assert len(corpus.OUTSIDE) >= 20 and not set(corpus.OUTSIDE) & ({q for q, _ in corpus.FACTS} | trained)
    # the scorers: the corpus's replies are about their topic; another topic's word is not
    assert np.mean([corpus.is_about(reply, word) for _, word, reply in topic]) >= 0.9
    assert not corpus.is_about("Here is a story about a dog.\n\nOnce upon a time, there was a cat named Tom.", "dog")
    assert corpus.is_about("Sure! Once upon a time, there was a little dog named Spot.", "dog")
    assert all(a.endswith((".", "!")) and m[-1]["role"] == "user" for m, a in recall)
    assert all(corpus.declines(reply) for reply in corpus._UNKNOWN_REPLIES)
    assert not corpus.declines("The sky is blue.") and not corpus.declines(corpus.FACTS[0][1])
    assert corpus.objects_per_story(["Tom lost his kite. The kite flew.", "A ball and a red car.", "Hi."]) == 1.0


# ---------------------------------------------------------------------------- stories

def test_txt_stories_split_on_endoftext_also_inline(tmp_path):
    assert list(data.iter_stories(fixture("stories.txt"))) == TXT_STORIES
    assert list(data.iter_stories(gzipped(tmp_path, "stories.txt"))) == TXT_STORIES


def test_json_shard_and_tar_of_shards(tmp_path, capsys):
    assert list(data.iter_stories(fixture("stories_shard.json"))) == SHARD_STORIES
    err = capsys.readouterr().err
    assert "stories_shard.json:element 1" in err and "skipped 1 malformed" in err
    assert list(data.iter_stories(gzipped(tmp_path, "stories_shard.json"))) == SHARD_STORIES
    tar_path = tmp_path / "TinyStories_all_data.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for i in range(2):
            tar.add(fixture("stories_shard.json"), arcname=f"data0{i}.json")
        info = tarfile.TarInfo("README.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    assert list(data.iter_stories(str(tar_path))) == SHARD_STORIES * 2


def test_json_array_streams_across_chunk_edges():
    stories = [{"story": f"Story number {i} \u00e9\u00e8 with a number {i * 12345}"} for i in range(50)]
    raw = json.dumps(stories, indent=2, ensure_ascii=False).encode()
    assert list(data._json_array(io.BytesIO(raw), "x", chunk=7)) == stories


def test_bad_story_files_are_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n<|endoftext|>\n  \n")
    with pytest.raises(data.DataError, match="empty.txt: no stories"):
        list(data.iter_stories(str(tmp_path / "empty.txt")))
    with pytest.raises(data.DataError, match="unrecognised story file"):
        list(data.iter_stories(str(tmp_path / "data.csv")))
    with pytest.raises(data.DataError, match="missing.txt: cannot open"):
        list(data.iter_stories(str(tmp_path / "missing.txt")))
    (tmp_path / "bad.json").write_text('[{"story": "one"}, {"story": "two" "three"}]')
    with pytest.raises(data.DataError, match=r"bad.json: invalid JSON at character 35: Expecting .,. delimiter"):
        list(data.iter_stories(str(tmp_path / "bad.json")))
    (tmp_path / "obj.json").write_text('{"story": "x"}')
    with pytest.raises(data.DataError, match="obj.json: expected a JSON array"):
        list(data.iter_stories(str(tmp_path / "obj.json")))
    (tmp_path / "fake.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(data.DataError, match="fake.txt.gz: corrupt or truncated"):
        list(data.iter_stories(str(tmp_path / "fake.txt.gz")))


# ---------------------------------------------------------------------------- chats

def test_chat_jsonl_skips_malformed_lines_with_file_and_line(tmp_path, capsys):
    chats = list(data.iter_chats(fixture("chats.jsonl")))
    assert [len(c) for c in chats] == [3, 2, 4]   # the trailing user turn of the second is dropped
    assert chats[1][-1] == {"role": "assistant", "content": "Once upon a time..."}
    err = capsys.readouterr().err
    assert "chats.jsonl:3: skipped" in err and "chats.jsonl:4: skipped" in err and "not valid JSON" in err
    assert "chats.jsonl:8" not in err and "skipped 4 malformed record(s) in all" in err  # 3, 4, 6, 8
    assert list(data.iter_chats(gzipped(tmp_path, "chats.jsonl"))) == chats


def test_oasst_messages_and_trees_flatten_to_the_same_conversations(tmp_path, capsys):
    for name in ("oasst_messages.jsonl", "oasst_trees.jsonl"):
        assert list(data.iter_chats(fixture(name))) == OASST_EN, name
        assert list(data.iter_chats(gzipped(tmp_path, name))) == OASST_EN, name
    err = capsys.readouterr().err
    assert "oasst_messages.jsonl:4: skipped" in err      # the truncated line
    assert "oasst_trees.jsonl:3: skipped" in err and "bad OASST tree" in err
    every = list(data.iter_chats(fixture("oasst_trees.jsonl"), lang=None))
    assert every[-1] == [{"role": "user", "content": "Hola"}, {"role": "assistant", "content": "Hola, que tal?"}]
    assert len(every) == 5 and [t["content"] for t in every[1]][2:] == ["Wie heisst eine Katze auf Deutsch?", "Katze."]
    with pytest.raises(data.DataError, match="no usable conversation.*'fr'"):
        list(data.iter_chats(fixture("oasst_trees.jsonl"), lang="fr"))


def test_flatten_rule_on_a_hand_built_tree():
    def m(role, text, replies=(), **kw):
        return dict(dict(role=role, text=text, lang="en", replies=list(replies)), **kw)
    tree = m("prompter", "Q1", [
        m("assistant", "unranked", []),
        m("assistant", "second best", [m("prompter", "never seen", [m("assistant", "x", rank=0)])], rank=1),
        m("assistant", "best", [
            m("prompter", "Q2", [m("assistant", "A2 deleted", deleted=True, rank=0),
                                 m("assistant", "A2", rank=1,
                                   replies=[m("prompter", "Q3 without an answer")])]),
            m("prompter", "Q2b", [m("assistant", "A2b rejected", review_result=False)]),
            m("prompter", "Q2c", [m("assistant", "A2c")]),
        ], rank=0),
    ])
    got = [[t["content"] for t in chat] for chat in data.flatten_oasst(tree)]
    assert got == [["Q1", "best", "Q2", "A2"], ["Q1", "best", "Q2c", "A2c"]]
    # every assistant turn is the best usable one; a branch without any stops at the last reply
    only_rejected = m("prompter", "Q", [m("assistant", "A", rank=0, replies=[
        m("prompter", "Q2", [m("assistant", "bad", review_result=False)])])])
    assert [[t["content"] for t in c] for c in data.flatten_oasst(only_rejected)] == [["Q", "A"]]
    assert list(data.flatten_oasst(m("prompter", "Q", lang="de", replies=[m("assistant", "A")]))) == []


def test_bad_chat_files_are_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(data.DataError, match="empty.jsonl: no JSON lines"):
        list(data.iter_chats(str(tmp_path / "empty.jsonl")))
    (tmp_path / "other.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(data.DataError, match=r"other.jsonl:1: unrecognised chat record.*'answer', 'question'"):
        list(data.iter_chats(str(tmp_path / "other.jsonl")))
    (tmp_path / "array.jsonl").write_text('[{"messages": []}]\n')
    with pytest.raises(data.DataError, match="array.jsonl: this is a JSON array"):
        list(data.iter_chats(str(tmp_path / "array.jsonl")))
    (tmp_path / "nouse.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(data.DataError, match="nouse.jsonl: no usable conversation"):
        list(data.iter_chats(str(tmp_path / "nouse.jsonl")))


def test_convert_writes_common_chat_jsonl(tmp_path, capsys):
    out = tmp_path / "chats.jsonl.gz"
    assert data.main(["convert", fixture("oasst_messages.jsonl"), str(out)]) == 0
    assert "3 conversations" in capsys.readouterr().out
    lines = gzip.decompress(out.read_bytes()).decode().splitlines()
    assert [json.loads(line) for line in lines] == [{"messages": c} for c in OASST_EN]
    assert list(data.iter_chats(str(out))) == OASST_EN       # and it reads back
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]
    assert data.main(["convert", str(tmp_path / "nope.jsonl"), str(tmp_path / "x.jsonl")]) == 2
    assert "nope.jsonl: cannot open" in capsys.readouterr().err


# ---------------------------------------------------------------------------- token cache

def test_story_tokens_are_cached_beside_the_source_and_reused(tmp_path, tok, monkeypatch):
    src = tmp_path / "stories.txt"
    shutil.copy(fixture("stories.txt"), src)
    out_dir = str(tmp_path / "out")
    train_part, val, key = data.load_tokens([str(src)], tok, out_dir)
    whole = np.concatenate([train_part, val])[:, 0]
    expected = [t for s in TXT_STORIES for t in tok.encode(s) + [tok.eot_id]]
    assert whole.tolist() == expected
    cache = [p for p in os.listdir(tmp_path) if p.endswith(".tok.u16")]
    assert len(cache) == 1 and cache[0].startswith("stories.txt.") and whole.dtype == np.uint16
    assert os.path.getsize(tmp_path / cache[0]) == 2 * len(expected)
    # a second load reads the memmap without tokenizing
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda *a: pytest.fail("tokenized again"))
    again, _, key2 = data.load_tokens([str(src)], tok, out_dir)
    assert key2 == key and np.array_equal(again, train_part) and isinstance(again, np.memmap)
    monkeypatch.undo()
    # another tokenizer or changed data get their own cache
    other = Tokenizer.train(TXT_STORIES * 5, 300)
    assert data.load_tokens([str(src)], other, out_dir)[2] != key
    with open(src, "a") as f:
        f.write("<|endoftext|>A new story.\n")
    assert data.load_tokens([str(src)], tok, out_dir)[2] != key
    assert len([p for p in os.listdir(tmp_path) if p.endswith(".tok.u16")]) == 3
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]



def test_deeply_nested_json_is_a_malformed_record_not_a_crash(tmp_path, capsys):
    deep = b"[" * 100_000 + b"]" * 100_000
    chats = tmp_path / "chats.jsonl"
    chats.write_bytes(b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n'
                      + deep + b"\n")
    assert len(list(data.iter_chats(str(chats)))) == 1
    assert "chats.jsonl:2: skipped" in capsys.readouterr().err
    shard = tmp_path / "shard.json"
    shard.write_bytes(b'[{"story": "A cat."}, ' + deep + b"]")
    with pytest.raises(data.DataError, match="nested too deeply"):
        list(data.iter_stories(str(shard)))


def test_oasst_messages_with_bad_parent_ids_duplicates_and_a_long_chain(tmp_path, capsys):
    msgs = [{"message_id": "r", "parent_id": None, "role": "prompter", "text": "Hi", "lang": "en"},
            {"message_id": "a", "parent_id": "r", "role": "assistant", "text": "Hello", "lang": "en"},
            {"message_id": "x", "parent_id": ["r"], "role": "assistant", "text": "Bad", "lang": "en"},
            {"message_id": "a", "parent_id": "r", "role": "assistant", "text": "Again", "lang": "en"}]
    parent = "a"
    for i in range(3000):                                   # one conversation of 3,002 turns
        msgs.append({"message_id": f"m{i}", "parent_id": parent, "role": ("prompter", "assistant")[i % 2],
                     "text": f"turn {i}", "lang": "en"})
        parent = f"m{i}"
    path = tmp_path / "oasst_messages.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in msgs))
    chats = list(data.iter_chats(str(path)))
    assert len(chats) == 1 and len(chats[0]) == 3002
    assert chats[0][1]["content"] == "Hello" and chats[0][-1]["content"] == "turn 2999"
    err = capsys.readouterr().err
    assert "oasst_messages.jsonl:3: skipped" in err and "parent_id must be a string or null, got list" in err
    assert "oasst_messages.jsonl:4: skipped" in err and "duplicate message_id 'a'" in err

def test_a_killed_cache_build_leaves_no_temporary_file_behind(tmp_path, tok):
    import subprocess
    import sys
    src = tmp_path / "stories.txt"
    shutil.copy(fixture("stories.txt"), src)
    tok_path = str(tmp_path / "tok.json")
    tok.save(tok_path)
    # a build killed while writing (os._exit: no finally, no cleanup), as by SIGKILL
    killed = subprocess.run([sys.executable, "-c", f"""
import os, numpy as np, wyrd, data
from tokenizer import Tokenizer
contiguous = np.ascontiguousarray
def die(*a, **k):                                         # once the temporary file is open
    if any(".tmp" in p for p in os.listdir({str(tmp_path)!r})):
        os._exit(9)
    return contiguous(*a, **k)
np.ascontiguousarray = die
data.load_tokens([{str(src)!r}], Tokenizer.load({tok_path!r}), {str(tmp_path / "out")!r})
"""], cwd=os.path.dirname(FIX), env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(FIX))),
        capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9, killed.stderr
    left = [p for p in os.listdir(tmp_path) if ".tmp" in p]
    assert len(left) == 1                                     # what a kill leaves ...
    data.load_tokens([str(src)], tok, str(tmp_path / "out"))
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]   # ... the next build removes


def test_a_read_only_data_folder_gets_its_cache_under_the_out_dir(tmp_path, tok):
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(fixture("stories.txt"), folder / "stories.txt")
    folder.chmod(0o555)
    try:
        data.load_tokens([str(folder / "stories.txt")], tok, str(tmp_path / "out"))
        assert os.listdir(folder) == ["stories.txt"]
        assert any(p.startswith("stories.txt.") and p.endswith(".tok.u16") for p in os.listdir(tmp_path / "out"))
    finally:
        folder.chmod(0o755)


def test_builtin_and_chat_tokens_hold_ids_and_the_assistant_mask(tmp_path, tok):
    out_dir = str(tmp_path)
    tr, val, _ = data.load_tokens(["builtin:40"], tok, out_dir, chat=True)
    assert os.listdir(tmp_path) and all(p.startswith("builtin-chats-40.") for p in os.listdir(tmp_path))
    both = np.concatenate([tr, val])
    chats = corpus.builtin_chats(40, seed=1)
    ids, mask = [], []
    for chat in chats:
        i, m = tok.render_chat(chat)
        ids += i + [tok.eot_id]
        mask += m + [0]
    assert both[:, 0].tolist() == ids and both[:, 1].tolist() == mask
    assert 0 < len(val) < len(both) // 5 and tr[-1, 0] == tok.eot_id   # split after a conversation


def test_split_held_out_cuts_after_a_document():
    eot = 9
    tokens = np.array([1, 2, 9, 3, 4, 5, 9, 6, 7, 9, 8, 8, 8, 9] * 10).reshape(-1, 1)
    tr, val = data.split_held_out(tokens, eot, fraction=0.2, cap=1000)
    assert len(tr) + len(val) == len(tokens) and tr[-1, 0] == eot
    assert 0.1 * len(tokens) < len(val) <= 0.2 * len(tokens)
    assert len(data.split_held_out(tokens, eot, fraction=0.5, cap=10)[1]) <= 10


# ---------------------------------------------------------------------------- batches

def test_stream_rows_are_shifted_windows_in_a_seeded_order():
    tokens = np.arange(1, 42).reshape(-1, 1)    # 41 tokens
    rows = data.Rows.stream(tokens, seq_len=8, pad_id=0)
    assert len(rows) == 5
    x, y, m = rows.batch([0, 4])
    assert x[0].tolist() == list(range(1, 9)) and y[0].tolist() == list(range(2, 10))
    assert x[1].tolist() == list(range(33, 41)) and y[1].tolist() == list(range(34, 42)) and m.all()
    first = rows.at(0, 5, seed=3)
    assert sorted(first) == list(range(5)) and rows.at(0, 5, seed=3) == first
    assert sorted(rows.at(5, 5, seed=3)) == list(range(5)) and rows.at(5, 5, seed=3) != first
    assert rows.at(3, 4, seed=3) == first[3:] + rows.at(5, 2, seed=3)  # across the epoch edge


def test_packed_rows_keep_conversations_whole_and_mask_padding():
    eot = 0
    # three conversations: lengths 5, 4, 9 (ids then eot); mask 1 on the "assistant" ids 7
    convs = [[5, 6, 7, 7, eot], [5, 7, 7, eot], [5, 6, 6, 6, 6, 6, 7, 7, eot]]
    ids = [t for c in convs for t in c]
    mask = [int(t == 7) for t in ids]
    tokens = np.stack([ids, mask], axis=1)
    rows = data.Rows.packed(tokens, seq_len=8, eot=eot)
    assert rows.starts.tolist() == [0, 9] and rows.lengths.tolist() == [9, 9]
    x, y, m = rows.batch([0, 1])
    assert x[0].tolist() == [5, 6, 7, 7, 0, 5, 7, 7] and y[0].tolist() == [6, 7, 7, 0, 5, 7, 7, 0]
    assert m[0].tolist() == [0, 1, 1, 0, 0, 1, 1, 0]
    short = data.Rows.packed(tokens, seq_len=4, eot=eot)   # the long one is cut to 5 tokens, its 7s are lost
    assert short.starts.tolist() == [0, 5] and short.lengths.tolist() == [5, 4]
    x, y, m = short.batch([1])
    assert x[0].tolist() == [5, 7, 7, 0] and m[0].tolist() == [1, 1, 0, 0]


# ---------------------------------------------------------------------------- reliability: the cache key

def test_the_cache_key_follows_the_content_not_the_modification_time(tmp_path, tok, monkeypatch):
    src = tmp_path / "stories.txt"
    src.write_text("Tom had a red hat.<|endoftext|>Ann had a blue cup.\n")
    out_dir = str(tmp_path / "out")
    _, _, key = data.load_tokens([str(src)], tok, out_dir)
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns + 5 * 10**9, st.st_mtime_ns + 5 * 10**9))    # `touch`
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda *a: pytest.fail("tokenized again"))
    assert data.load_tokens([str(src)], tok, out_dir)[2] == key                     # same key: resume goes on
    monkeypatch.undo()
    st = os.stat(src)
    src.write_text("Tom had a red cap.<|endoftext|>Ann had a blue cup.\n")         # same size ...
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))                               # ... and time
    tr, val, key2 = data.load_tokens([str(src)], tok, out_dir)
    assert key2 != key
    assert np.concatenate([tr, val])[:, 0].tolist() == tok.encode("Tom had a red cap.") + [tok.eot_id] + \
        tok.encode("Ann had a blue cup.") + [tok.eot_id]


# ---------------------------------------------------------------------------- reliability: a corrupt token cache

def test_a_corrupt_token_cache_is_rebuilt_with_a_note(tmp_path, tok, capsys):
    src = tmp_path / "stories.txt"
    shutil.copy(fixture("stories.txt"), src)
    out_dir = str(tmp_path / "out")
    tr, val, _ = data.load_tokens([str(src)], tok, out_dir)
    good = np.concatenate([tr, val]).copy()
    cache = str(tmp_path / next(p for p in os.listdir(tmp_path) if p.endswith(".tok.u16")))
    sidecar = cache[:-len("u16")] + "json"
    meta = open(sidecar).read()

    def reload():
        tr, val, _ = data.load_tokens([str(src)], tok, out_dir)
        assert np.array_equal(np.concatenate([tr, val]), good)
        return capsys.readouterr().err

    def poke(offset, value):
        with open(cache, "r+b") as f:
            f.seek(offset)
            f.write(np.uint16(value).tobytes())

    poke(6, 65535)                                                   # an id no tokenizer of 400 has
    assert "token id 65535 >= the vocabulary size" in reload()
    poke(2 * (len(good) - 1), tok.vocab_size)                        # the last id, just out of range
    assert "token cache is invalid" in reload()
    with open(cache, "r+b") as f:                                    # truncated
        f.truncate(os.path.getsize(cache) - 3)
    assert "does not match" in reload()
    cases = [meta.replace(f'"tokens": {len(good)}', f'"tokens": {len(good) + 1000}'),   # claims more tokens
             meta.replace(f'"tokens": {len(good)}', '"tokens": -2'),
             meta.replace(f'"tokens": {len(good)}', '"tokens": ' + "9" * 5000),     # beyond int()'s digits
             "[" * 100_000 + "]" * 100_000, '["tokens"]', "\xff garbage", ""]
    for text in cases:
        with open(sidecar, "w", encoding="latin-1") as f:
            f.write(text)
        err = reload()
        assert ("rebuilding" in err or "invalid" in err) and "Traceback" not in err, text[:40]
    assert reload() == ""                                             # rebuilt once, then reused


def test_a_chat_cache_with_a_bad_mask_is_rebuilt(tmp_path, tok, capsys):
    src = tmp_path / "chats.jsonl"
    shutil.copy(fixture("chats.jsonl"), src)
    tr, val, _ = data.load_tokens([str(src)], tok, str(tmp_path / "out"), chat=True)
    good = np.concatenate([tr, val]).copy()
    cache = str(tmp_path / next(p for p in os.listdir(tmp_path) if p.endswith(".tok.u16")))
    with open(cache, "r+b") as f:
        f.seek(2 * 3)                                                # the mask of the second token
        f.write(np.uint16(7).tobytes())
    capsys.readouterr()
    tr, val, _ = data.load_tokens([str(src)], tok, str(tmp_path / "out"), chat=True)
    assert np.array_equal(np.concatenate([tr, val]), good)
    assert "loss mask value 7, expected 0 or 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------- reliability: bombs and limits

MEMORY_BOUND_MB = 300   # what reading and tokenising any file may take above the program's own (data.py's limits)


def peak_memory(tmp_path, tok, code, limit_mb=1500):
    """Run `code` (with `data` and `tok` loaded) in a fresh Python under an address-space
    limit; -> (its result, the MB of peak RSS above the RSS it had before `code`). The
    peak is RUSAGE_CHILDREN's of a wrapper whose only child it is."""
    import subprocess
    import sys
    tok_path = tmp_path / "tok.json"
    tok.save(str(tok_path))
    child = (f"import resource, sys, data\nfrom tokenizer import Tokenizer\ntok = Tokenizer.load({str(tok_path)!r})\n"
             "print('BASE', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n" + code)
    wrapper = f"""
import resource, subprocess, sys
def limit():
    resource.setrlimit(resource.RLIMIT_AS, ({limit_mb << 20}, {limit_mb << 20}))
r = subprocess.run([sys.executable, "-c", {child!r}], preexec_fn=limit, capture_output=True, text=True)
sys.stdout.write(r.stdout)
sys.stderr.write(r.stderr)
print("PEAK", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "RC", r.returncode)
"""
    root = os.path.dirname(FIX)
    r = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                       env=dict(os.environ, PYTHONPATH=os.path.dirname(root), OMP_NUM_THREADS="1",
                                OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1"))
    lines = r.stdout.splitlines()
    base = int(next(x for x in lines if x.startswith("BASE")).split()[1])
    peak, rc = (int(v) for v in lines[-1].split()[1::2])
    assert rc == 0, r.stderr[-2000:]
    return r, (peak - base) / 1024


def test_decompression_bombs_stay_within_the_memory_bound(tmp_path, tok):
    """Each bomb unpacks to 12 MB of "abab..." (without the limits: 2.3 GB for 10 MB)."""
    bomb = b"ab" * (6 << 20)
    (tmp_path / "stories.txt.gz").write_bytes(gzip.compress(b"Tom ran.<|endoftext|>" + bomb + b"<|endoftext|>Ann sat.", 9))
    (tmp_path / "lines.txt.gz").write_bytes(gzip.compress(b"Tom ran.<|endoftext|>" + (b"ab" * 50 + b"\n") * 120_000, 9))
    (tmp_path / "shard.json.gz").write_bytes(gzip.compress(b'[{"story": "Tom ran."}, {"story": "' + bomb +
                                                           b'"}, {"story": "Ann sat."}]', 9))
    hi = b'{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "'
    (tmp_path / "chats.jsonl.gz").write_bytes(gzip.compress(b'{"messages": [' + hi + b'Hello"}]}\n{"messages": [' + hi +
                                                            bomb + b'"}]}\n' + b'{"messages": [' + hi + b'Yes"}]}\n', 9))
    (tmp_path / "mid.jsonl.gz").write_bytes(gzip.compress(b'{"messages": [' + hi + b'Hello"}]}\n{"messages": [' + hi +
                                                          b"ab" * 600_000 + b'"}]}\n', 9))   # 1.2M chars, one line
    r, above = peak_memory(tmp_path, tok, """
for name in ("stories.txt.gz", "lines.txt.gz", "shard.json.gz"):
    tr, val, _ = data.load_tokens([name], tok, "out")
    print(name, len(tr) + len(val))
for name in ("chats.jsonl.gz", "mid.jsonl.gz"):
    tr, val, _ = data.load_tokens([name], tok, "out", chat=True)
    print(name, len(tr) + len(val))
print("texts", sum(map(len, data.tokenizer_texts(["stories.txt.gz", "shard.json.gz"]))),
      sum(map(len, data.tokenizer_texts(["chats.jsonl.gz"], chat=True))))
print("convert", data.main(["convert", "chats.jsonl.gz", "out.jsonl"]))
""")
    assert above < MEMORY_BOUND_MB, above
    print(f"{above:.0f} MB above", r.stdout)
    out = r.stdout
    assert re.search(r"stories.txt.gz \d\d?\n", out)        # the two short stories, not the bomb
    assert re.search(r"lines.txt.gz \d\d?\n", out) and re.search(r"shard.json.gz \d\d?\n", out)
    assert re.search(r"texts \d\d? \d\d\d?\n", out) and "convert 0" in out
    err = r.stderr
    assert "stories.txt.gz:story 2: skipped" in err and "longer than 1,000,000 characters (12,582,912)" in err
    assert "lines.txt.gz:story 2: skipped" in err
    assert "shard.json.gz:element 1: skipped" in err and "larger than 8,388,608 characters of JSON" in err
    assert "chats.jsonl.gz:2: skipped" in err and "longer than 8,388,608 bytes" in err
    assert "mid.jsonl.gz:2: skipped" in err and "the conversation is longer than 1,000,000 characters" in err
    assert "Traceback" not in err
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def test_a_tar_bomb_of_headers_is_refused_or_streamed(tmp_path, tok):
    shard = b'[{"story": "A cat."}]'
    pax = tmp_path / "pax.tar.gz"                  # a 60 MB pax header in 60 KB
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("data00.json")
        info.size, info.pax_headers = len(shard), {"comment": "a" * (60 << 20)}
        tar.addfile(info, io.BytesIO(shard))
    pax.write_bytes(gzip.compress(buf.getvalue(), 9))
    many = tmp_path / "many.tar.gz"                # 30,000 empty members, then a shard
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(30_000):
            tar.addfile(tarfile.TarInfo(f"e{i}"), io.BytesIO(b""))
        info = tarfile.TarInfo("data01.json")
        info.size = len(shard)
        tar.addfile(info, io.BytesIO(shard))
    many.write_bytes(gzip.compress(buf.getvalue(), 9))
    with pytest.raises(data.DataError, match=r"pax.tar.gz: an extended tar header of 62,914,5\d\d bytes"):
        list(data.iter_stories(str(pax)))
    members = []
    real_next = tarfile.TarFile.next

    def spy(self):
        members.append(len(self.members))
        return real_next(self)
    tarfile.TarFile.next = spy
    try:
        assert list(data.iter_stories(str(many))) == ["A cat."]
    finally:
        tarfile.TarFile.next = real_next
    assert max(members) <= 1                       # the headers read are not all kept


def test_an_oasst_chain_with_a_side_reply_at_every_turn_stays_linear(tmp_path, capsys):
    """8,000 turns, and a user's side question (answered) at each assistant turn: every side
    branch repeats the chain before it, so flattening all of them is quadratic (816 MB of
    tokens from a 1.7 MB file). The conversations keep at most OASST_REPEAT x the tree's text."""
    msgs = [{"message_id": "m0", "parent_id": None, "role": "prompter", "text": "Tell me a long story.", "lang": "en"}]
    for i in range(1, 8000):
        role = ("prompter", "assistant")[i % 2]
        msgs.append({"message_id": f"m{i}", "parent_id": f"m{i - 1}", "role": role, "text": f"turn {i} " * 8,
                     "lang": "en", "rank": 0})
        if role == "assistant":                      # the side branch: a question and its answer
            msgs.append({"message_id": f"s{i}", "parent_id": f"m{i}", "role": "prompter", "text": "Why?",
                         "lang": "en"})
            msgs.append({"message_id": f"t{i}", "parent_id": f"s{i}", "role": "assistant", "text": "Because.",
                         "lang": "en"})
    path = tmp_path / "chain.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in msgs))
    text = sum(len(m["text"]) + data.TURN_CHARS for m in msgs)
    chats = list(data.iter_chats(str(path)))
    kept = sum(len(t["content"]) + data.TURN_CHARS for c in chats for t in c)
    assert len(chats) > 1 and kept <= data.OASST_REPEAT * text     # without the bound: ~1,000x the text
    err = capsys.readouterr().err
    assert "chain.jsonl: left out" in err and "they repeat the turns before their branch" in err, err


def test_an_oasst_tree_nested_deeper_than_the_json_parser_recurses_is_read(tmp_path):
    """A valid 600-turn tree nests 1,200 JSON levels: json.loads gives RecursionError, the
    flat parser reads it."""
    line = ""
    for i in range(599, -1, -1):                            # written out: json.dumps recurses too
        line = f'{{"role": "{("prompter", "assistant")[i % 2]}", "text": "turn {i}", "lang": "en", "replies": [{line}]}}'
    path = tmp_path / "trees.jsonl"
    path.write_text('{"message_tree_id": "t", "prompt": ' + line + "}\n")
    with pytest.raises(RecursionError):
        json.loads(path.read_text())
    chats = list(data.iter_chats(str(path)))
    assert len(chats) == 1 and len(chats[0]) == 600 and chats[0][-1]["content"] == "turn 599"


@pytest.mark.parametrize("source", ["builtin:1", "builtin:100001", "builtin:99999999999", "builtin:٣", "builtin:x"])
def test_builtin_counts_out_of_range_are_one_error(source):
    """builtin:N generates N documents in memory: beyond 100,000 it is refused, not started."""
    with pytest.raises(data.DataError, match=r"expected builtin:N with 2 <= N <= 100,000 documents"):
        data.builtin_documents(source, chat=False)


def test_convert_never_replaces_a_file_it_was_not_asked_to(tmp_path, capsys):
    """A user's file, a link, a device or the input itself is never replaced; an existing
    .jsonl only with --overwrite."""
    src = tmp_path / "in.jsonl"
    data.write_chats(src, data.builtin_documents("builtin:5", chat=True))
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    mine = tmp_path / "mine.jsonl"
    mine.write_text("mine\n")
    os.symlink(mine, tmp_path / "link.jsonl")
    os.mkfifo(tmp_path / "pipe.jsonl")
    before = {p.name: p.read_bytes() for p in (src, keep, mine)}
    cases = [(["builtin:5", keep], "expected an output name ending in .jsonl"),
             (["builtin:5", mine], "exists; pass --overwrite"),
             (["builtin:5", tmp_path / "link.jsonl", "--overwrite"], "is not a regular file"),
             (["builtin:5", tmp_path / "pipe.jsonl", "--overwrite"], "is not a regular file"),
             ([src, src], "exists; pass --overwrite"),
             ([src, src, "--overwrite"], "is the input")]
    for args, says in cases:
        code = data.main(["convert"] + [str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and says in err, (args, err)
    assert {p.name: p.read_bytes() for p in (src, keep, mine)} == before
    assert os.path.islink(tmp_path / "link.jsonl") and not os.path.isfile(tmp_path / "pipe.jsonl")
    assert data.main(["convert", "builtin:5", str(mine), "--overwrite"]) == 0
    assert len(mine.read_text().splitlines()) == 5


def test_a_5000_digit_integer_or_a_lone_surrogate_in_a_record_skips_only_that_record(tmp_path, capsys):
    """Python's int() refuses 4,300+ digits and UTF-8 refuses a lone surrogate (a JSON escape
    such as \\ud800): each was a traceback (ValueError, UnicodeEncodeError in convert)."""
    shard = tmp_path / "data00.json"
    shard.write_text('[{"story": "Tom ran."}, {"story": "Ann sat.", "id": ' + "9" * 5000 + '}, '
                     '{"story": "A \\ud800 cat."}, {"story": "Sam hid."}]')
    assert list(data.iter_stories(str(shard))) == ["Tom ran.", "Sam hid."]
    err = capsys.readouterr().err
    assert "element 1: skipped" in err and "a number of 5,000 digits" in err and "lone surrogate" in err, err
    chats = tmp_path / "chats.jsonl"
    hi = '{"role": "user", "content": "Hi"}, {"role": "assistant", "content": '
    chats.write_text('{"messages": [' + hi + '"Hello"}]}\n{"messages": [' + hi + '"Bad \\ud800 reply"}]}\n'
                     '{"messages": [' + hi + '"Yes"}], "n": ' + "7" * 5000 + '}\n')
    assert data.main(["convert", str(chats), str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [c["messages"][1]["content"] for c in out] == ["Hello"]
    err = capsys.readouterr().err
    assert "chats.jsonl:2: skipped" in err and "chats.jsonl:3: skipped" in err and "Traceback" not in err, err
