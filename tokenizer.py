"""
Byte-level BPE tokenizer with ChatML special tokens.

Vocabulary layout (what `train` produces):
    ids 0..255           the 256 single bytes, id == byte value
    ids 256..            one token per learned merge, in the order learned
    last len(specials)   the special tokens, e.g. <|endoftext|> <|im_start|> <|im_end|>
`vocab_size` counts all of them.

Pre-tokenization rule (the same as Hugging Face's ByteLevel pre-tokenizer with
use_regex=True and add_prefix_space=False, i.e. GPT-2's):

    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

Python's `re` has no \\p{..}, so the classes are built from the Unicode database:
\\p{L} = str.isalpha(), \\p{N} = isalnum() and not isalpha(), and \\s is the
Unicode White_Space set written out (Python's \\s also contains \\x1c-\\x1f,
which Oniguruma's does not). Characters outside the BMP are matched by a
guarded second branch so the common path stays a fast bitmap lookup.
Checked against `tokenizers` on every code point assigned in Python's Unicode
database (14.0 for Python 3.11); characters assigned in later Unicode versions
may be classed differently by a newer Oniguruma.
BPE never merges across pre-tokens, so "<|im_start|>" typed as text becomes
"<|", "im", "_", "start", "|>": special ids can only enter through
render_chat / render_message or explicit ids such as `tok.eot_id`.

Training: count distinct pre-tokens in one streaming pass (memory grows with
the number of distinct pre-tokens, not the corpus), then repeatedly merge the
most frequent adjacent pair. Ties go to the lexicographically smallest pair
(bytes of left token, bytes of right token). A pair whose merge would
recreate an existing token is skipped, so every merge makes a new token.

Encoding a pre-token applies merges lowest rank first, leftmost first -- the
rule of the Hugging Face BPE model -- so `tokenizers` loading our
tokenizer.json gives exactly our ids on text without special-token strings
(HF would turn a literal "<|im_end|>" in the text into the special id; we don't).
Lone surrogates (not valid Unicode) are encoded as U+FFFD.
"""

import codecs
import heapq
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from itertools import chain

from runtime import atomic_write

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOT, IM_START, IM_END = SPECIAL_TOKENS
MAX_VOCAB = 1 << 21
MAX_FILE = 128 << 20  # bytes of a tokenizer.json: MAX_VOCAB tokens and merges take ~70 MB
DEFAULT_SYSTEM = "You are Wyrd, a helpful AI assistant."
ROLES = ("system", "user", "assistant")


class TokenizerError(ValueError):
    pass


# ----------------------------------------------------------------------------
# pre-tokenization: the GPT-2 regex with \p{L}, \p{N}, \s spelled out for `re`

def _char_class(pred, lo, hi):
    """Regex class body (no brackets) of the code points in [lo, hi) where pred(char)."""
    parts, start = [], None
    for cp in range(lo, hi + 1):
        if cp < hi and pred(chr(cp)):
            if start is None:
                start = cp
        elif start is not None:
            last = cp - 1
            parts.append(f"\\U{start:08x}" if start == last else f"\\U{start:08x}-\\U{last:08x}")
            start = None
    return "".join(parts)


def _split_regex():
    is_letter = str.isalpha
    is_number = lambda ch: ch.isalnum() and not ch.isalpha()
    L, N = _char_class(is_letter, 0, 0x10000), _char_class(is_number, 0, 0x10000)
    L_astral, N_astral = _char_class(is_letter, 0x10000, 0x110000), _char_class(is_number, 0x10000, 0x110000)
    S = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # Unicode White_Space
    A = r"\U00010000-\U0010ffff"
    # re keeps BMP classes as a bitmap but scans astral ranges one by one, so the
    # astral part is only looked at (via a lookbehind) when the char is astral.
    letter = rf"(?:[{L}]|[{A}](?<=[{L_astral}]))"
    number = rf"(?:[{N}]|[{A}](?<=[{N_astral}]))"
    other = rf"(?:[^{S}{L}{N}{A}]|[{A}](?<![{L_astral}{N_astral}]))"
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?{letter}+| ?{number}+| ?{other}+|[{S}]+(?![^{S}])|[{S}]+")


_SPLIT = _split_regex()
_SURROGATE = re.compile("[\ud800-\udfff]")


def pretokenize(text):
    """Split text into the pieces BPE works on independently."""
    return _SPLIT.findall(text)


# GPT-2's reversible byte -> printable unicode char map, used only in tokenizer.json
def _bytes_to_unicode():
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _merge_pair(ids, a, b, new):
    """Replace every non-overlapping (a, b) in ids, left to right, with new."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class _PieceCache(dict):
    """pre-token -> ids; a miss runs BPE. TinyStories words repeat, so almost every lookup hits.
    `size` estimates the bytes it holds: an entry's objects (~200) and its characters and ids."""

    def __init__(self, bpe):
        super().__init__()
        self.bpe = bpe
        self.size = 0

    def __missing__(self, piece):
        ids = self[piece] = self.bpe(piece)
        self.size += 200 + len(piece) + 8 * len(ids)
        return ids

    def clear(self):
        super().clear()
        self.size = 0


class StreamDecoder:
    """Feed ids one at a time; get text only once its UTF-8 bytes are complete."""

    def __init__(self, vocab):
        self._vocab = vocab
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, id):
        if not 0 <= id < len(self._vocab):
            raise TokenizerError(f"token id {id} out of range [0, {len(self._vocab)})")
        return self._utf8.decode(self._vocab[id])

    def flush(self):
        """Whatever is still pending (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    _CACHE_LIMIT = 256 << 20  # bytes (estimated) the encode cache may hold before it is cleared

    def __init__(self, vocab, merges, special_ids):
        """
        vocab:       list of bytes, index = token id (specials hold their UTF-8 text)
        merges:      list of (left_id, right_id) in rank order; the result is the
                     id whose bytes are vocab[left] + vocab[right]
        special_ids: dict special string -> id
        """
        self.vocab = list(vocab)
        self.merges = list(merges)
        self.special_ids = dict(special_ids)
        specials = set(self.special_ids.values())
        index = {tok: i for i, tok in enumerate(self.vocab) if i not in specials}
        self._byte_ids = [index[bytes([b])] for b in range(256)]
        # (left, right) -> (rank, merged id)
        self._ranks = {(a, b): (r, index[self.vocab[a] + self.vocab[b]]) for r, (a, b) in enumerate(self.merges)}
        self._cache = _PieceCache(self._bpe)
        self._newline = self.encode("\n")

    @property
    def vocab_size(self):
        return len(self.vocab)

    @property
    def eot_id(self):
        return self.special_ids.get(EOT)

    @property
    def im_start_id(self):
        return self.special_ids.get(IM_START)

    @property
    def im_end_id(self):
        return self.special_ids.get(IM_END)

    # ------------------------------------------------------------------ training

    @classmethod
    def train(cls, texts, vocab_size, special_tokens=SPECIAL_TOKENS, verbose=False):
        """Learn a byte-level BPE vocabulary of at most vocab_size tokens (specials included)
        from an iterable of documents, read once."""
        special_tokens = tuple(special_tokens)
        if any(not isinstance(s, str) or not s for s in special_tokens) or len(set(special_tokens)) != len(special_tokens):
            raise TokenizerError(f"special_tokens must be distinct non-empty strings, got {special_tokens!r}")
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(special_tokens):
            raise TokenizerError(f"vocab_size must be an int >= {256 + len(special_tokens)} "
                                 f"(256 bytes + {len(special_tokens)} special tokens), got {vocab_size!r}")
        if isinstance(texts, (str, bytes)):
            raise TokenizerError("texts must be an iterable of documents (strings), not a single string")

        word_counts = _count_pretokens(texts, verbose)
        if not word_counts:
            raise TokenizerError("cannot train a tokenizer on an empty corpus")
        vocab = [bytes([b]) for b in range(256)]
        merges = _learn_merges(word_counts, vocab, vocab_size - len(special_tokens), verbose)
        special_ids = {s: len(vocab) + i for i, s in enumerate(special_tokens)}
        vocab += [s.encode("utf-8") for s in special_tokens]
        return cls(vocab, merges, special_ids)

    # ------------------------------------------------------------------ encode / decode

    def _bpe(self, piece):
        """Byte ids of one pre-token, merged lowest rank first (leftmost first on equal ranks).
        Merging every occurrence of the best pair at once is the same thing, because a pair
        containing a token always ranks after the merge that created that token."""
        try:
            data = piece.encode("utf-8")
        except UnicodeEncodeError:
            data = _SURROGATE.sub("\ufffd", piece).encode("utf-8")
        ids = [self._byte_ids[b] for b in data]
        ranks = self._ranks
        never = (len(ranks), -1)
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, never))
            if pair not in ranks:
                break
            ids = _merge_pair(ids, pair[0], pair[1], ranks[pair][1])
        return ids

    def encode(self, text):
        """Token ids of plain text. Never produces a special id."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        if self._cache.size > self._CACHE_LIMIT:
            self._cache.clear()
        return list(chain.from_iterable(map(self._cache.__getitem__, _SPLIT.findall(text))))

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        """Text of ids; specials decode to their strings, invalid UTF-8 to U+FFFD."""
        ids = list(ids)
        if ids and not (0 <= min(ids) and max(ids) < len(self.vocab)):
            raise TokenizerError(f"token ids must be in [0, {len(self.vocab)}), got {min(ids)}..{max(ids)}")
        return b"".join(map(self.vocab.__getitem__, ids)).decode("utf-8", errors="replace")

    def stream_decoder(self):
        return StreamDecoder(self.vocab)

    # ------------------------------------------------------------------ ChatML

    def render_message(self, role, content):
        """One `<|im_start|>{role}\\n{content}<|im_end|>\\n` block -> (ids, mask).

        The text between the two specials is encoded as one segment, exactly as an
        encoder that splits on special tokens would do. mask is 1 on assistant
        content and its <|im_end|>. A token that holds bytes of the "{role}\\n"
        header is never a target (this happens only when the content starts
        with two or more whitespace characters, e.g. "\\n\\nHi").
        """
        _check_message(role, content, "message")
        if self.im_start_id is None or self.im_end_id is None:
            raise TokenizerError("this tokenizer has no <|im_start|>/<|im_end|> special tokens")
        header = role + "\n"
        body = self.encode(header + content)
        target = int(role == "assistant")
        body_mask, pos = [], 0
        for t in body:
            body_mask.append(target if pos >= len(header) else 0)  # header is ASCII: chars == bytes
            pos += len(self.vocab[t])
        ids = [self.im_start_id] + body + [self.im_end_id] + self._newline
        mask = [0] + body_mask + [target] + [0] * len(self._newline)
        return ids, mask

    def render_chat(self, messages, add_generation_prompt=False):
        """ChatML ids and training mask of a conversation; a system message is added if missing."""
        if not isinstance(messages, (list, tuple)):
            raise TokenizerError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TokenizerError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r:.80}")
            _check_message(m["role"], m["content"], f"messages[{i}]")
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + list(messages)
        ids, mask = [], []
        for m in messages:
            i, k = self.render_message(m["role"], m["content"])
            ids += i
            mask += k
        if add_generation_prompt:
            prompt = [self.im_start_id] + self.encode("assistant\n")
            ids += prompt
            mask += [0] * len(prompt)
        return ids, mask

    # ------------------------------------------------------------------ tokenizer.json

    def to_json(self):
        """Hugging Face tokenizer.json text (BPE model + ByteLevel pre-tokenizer/decoder)."""
        as_str = lambda tok: "".join(_BYTE_TO_CHAR[b] for b in tok)
        specials = set(self.special_ids.values())
        doc = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
                for s, i in sorted(self.special_ids.items(), key=lambda kv: kv[1])
            ],
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": {as_str(tok): i for i, tok in enumerate(self.vocab) if i not in specials},
                "merges": [f"{as_str(self.vocab[a])} {as_str(self.vocab[b])}" for a, b in self.merges],
            },
        }
        return json.dumps(doc, ensure_ascii=False, indent=2)

    @classmethod
    def from_json(cls, text, source="tokenizer JSON"):
        try:
            doc = json.loads(text)
        except (ValueError, TypeError, RecursionError) as e:  # ValueError: an integer over 4,300 digits too
            raise TokenizerError(f"{source}: not valid JSON ({e})") from None
        return cls(*_parse_tokenizer_json(doc, source))

    def save(self, path):
        """Write tokenizer.json (atomically: runtime.atomic_write)."""
        with atomic_write(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path):
        try:
            if not os.path.isfile(path):  # /dev/zero would be read until memory ran out
                raise TokenizerError(f"{path}: not a regular file; expected a tokenizer.json")
            if os.path.getsize(path) > MAX_FILE:
                raise TokenizerError(f"{path}: {os.path.getsize(path):,} bytes; a tokenizer.json holds at most "
                                     f"{MAX_FILE:,} (2**21 tokens and their merges)")
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: cannot read tokenizer file ({e})") from None
        return cls.from_json(text, source=str(path))

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, specials={list(self.special_ids)})"


def _check_message(role, content, where):
    if role not in ROLES:
        raise TokenizerError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if not isinstance(content, str):
        raise TokenizerError(f"{where}: content must be a str, got {type(content).__name__}")


# ----------------------------------------------------------------------------
# training

class _Progress:
    """One line to stderr at most every few seconds."""

    def __init__(self, verbose, every=2.0):
        self.verbose, self.every, self.last = verbose, every, time.time()

    def __call__(self, msg, force=False):
        if self.verbose and (force or time.time() - self.last >= self.every):
            print(f"tokenizer: {msg}", file=sys.stderr, flush=True)
            self.last = time.time()


def _count_pretokens(texts, verbose):
    """One streaming pass: UTF-8 pre-token bytes -> count."""
    progress = _Progress(verbose)
    counts, nchars = Counter(), 0
    for i, doc in enumerate(texts):
        if not isinstance(doc, str):
            raise TokenizerError(f"texts[{i}] is {type(doc).__name__}, expected str")
        counts.update(_SPLIT.findall(doc))
        nchars += len(doc)
        progress(f"read {i + 1:,} documents, {nchars / 1e6:,.1f}M chars, {len(counts):,} distinct pre-tokens")
    progress(f"read {nchars / 1e6:,.1f}M chars, {len(counts):,} distinct pre-tokens", force=True)
    word_counts = Counter()
    for piece, c in counts.items():
        try:
            word_counts[piece.encode("utf-8")] += c
        except UnicodeEncodeError:
            word_counts[_SURROGATE.sub("\ufffd", piece).encode("utf-8")] += c
    return word_counts


def _learn_merges(word_counts, vocab, n_tokens, verbose):
    """Grow vocab (list of bytes, starting with the 256 bytes) to n_tokens by BPE merges.

    Words are the distinct pre-tokens with their counts. pair_counts holds the
    weighted count of every adjacent pair, where[pair] the words that (may)
    contain it, and a heap gives the best pair; heap entries are checked
    against pair_counts when popped, since counts change after they are pushed.
    """
    words = [list(w) for w in word_counts]  # byte values == ids of the byte tokens
    freqs = list(word_counts.values())
    pair_counts, where = defaultdict(int), defaultdict(set)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    # max count first, then the lexicographically smallest (left bytes, right bytes)
    entry = lambda pair, c: (-c, vocab[pair[0]], vocab[pair[1]], pair)
    heap = [entry(p, c) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    index = {tok: i for i, tok in enumerate(vocab)}
    merges, skipped = [], set()
    progress = _Progress(verbose)
    start, target = len(vocab), n_tokens - len(vocab)
    while len(vocab) < n_tokens and heap:
        neg, _, _, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or pair in skipped:
            continue  # stale heap entry
        a, b = pair
        merged = vocab[a] + vocab[b]
        if merged in index:  # same bytes as an earlier token: keep tokens unique
            skipped.add(pair)
            continue
        new = len(vocab)
        vocab.append(merged)
        index[merged] = new
        merges.append(pair)

        delta = defaultdict(int)  # net change of pair counts caused by this merge
        for i in where.pop(pair):
            w = words[i]
            new_w = _merge_pair(w, a, b, new)
            if len(new_w) == len(w):
                continue  # where[] entries may be stale
            f = freqs[i]
            for p in zip(w, w[1:]):
                delta[p] -= f
            for p in zip(new_w, new_w[1:]):
                delta[p] += f
                where[p].add(i)
            words[i] = new_w
        for p, d in delta.items():
            if d:
                c = pair_counts[p] = pair_counts[p] + d
                if c > 0:
                    heapq.heappush(heap, entry(p, c))
                else:
                    del pair_counts[p]
        progress(f"merge {new - start + 1:,}/{target:,}: {merged!r} count {-neg:,}")
    if len(vocab) < n_tokens:
        progress(f"corpus ran out of pairs: {len(vocab):,} tokens instead of {n_tokens:,}", force=True)
    else:
        progress(f"learned {len(merges):,} merges", force=True)
    return merges


# ----------------------------------------------------------------------------
# tokenizer.json reading (validated, one readable message per problem)

def _parse_tokenizer_json(doc, source):
    def fail(field, expected, got):
        raise TokenizerError(f"{source}: field {field!r}: expected {expected}, got {got!r:.80}")

    if not isinstance(doc, dict):
        fail("<top level>", "a JSON object", type(doc).__name__)
    if doc.get("normalizer") is not None:
        fail("normalizer", "null", doc["normalizer"])
    pre = doc.get("pre_tokenizer")
    if not (isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("add_prefix_space") is False
            and pre.get("use_regex", True) is True):
        fail("pre_tokenizer", "ByteLevel with add_prefix_space false and use_regex true", pre)
    model = doc.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        fail("model", "an object with type 'BPE'", model)
    # options that would make HF tokenize differently from us
    if model.get("dropout") not in (None, 0):
        fail("model.dropout", "null", model["dropout"])
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key) not in (None, ""):
            fail(f"model.{key}", "null", model[key])
    for key in ("byte_fallback", "ignore_merges"):
        if model.get(key, False) is not False:
            fail(f"model.{key}", "false", model[key])

    vocab_json = model.get("vocab")
    if not isinstance(vocab_json, dict):
        fail("model.vocab", "an object mapping token -> id", vocab_json)
    if len(vocab_json) > MAX_VOCAB:  # as many as a model may have (wyrd.LIMITS)
        fail("model.vocab", f"at most {MAX_VOCAB:,} tokens", len(vocab_json))
    id_to_bytes = {}
    for tok, i in vocab_json.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            fail(f"model.vocab[{tok!r}]", "a non-negative integer id", i)
        if any(c not in _CHAR_TO_BYTE for c in tok) or not tok:
            fail(f"model.vocab[{tok!r}]", "a byte-level token (GPT-2 byte-to-unicode characters)", tok)
        if i in id_to_bytes:
            fail(f"model.vocab[{tok!r}]", "a unique id", i)
        id_to_bytes[i] = bytes(_CHAR_TO_BYTE[c] for c in tok)

    added = doc.get("added_tokens", [])
    if not isinstance(added, list):
        fail("added_tokens", "a list", added)
    special_ids = {}
    for k, t in enumerate(added):
        if not (isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str)):
            fail(f"added_tokens[{k}]", "an object with integer 'id' and string 'content'", t)
        if t.get("special") is not True:
            fail(f"added_tokens[{k}].special", "true (only special added tokens are supported)", t.get("special"))
        if not t["content"] or _SURROGATE.search(t["content"]):
            fail(f"added_tokens[{k}].content", "a non-empty string of valid Unicode", t["content"])
        if t["content"] in special_ids:
            fail(f"added_tokens[{k}].content", "a unique special token", t["content"])
        special_ids[t["content"]] = t["id"]
        # a special may also sit in model.vocab (GPT-2 does this) but not with another id's slot
        if t["id"] in id_to_bytes and vocab_json.get(t["content"]) != t["id"]:
            fail(f"added_tokens[{k}].id", "an id not used by another vocab token", t["id"])
        id_to_bytes[t["id"]] = t["content"].encode("utf-8")

    n = len(id_to_bytes)
    if set(id_to_bytes) != set(range(n)):
        missing = sorted(set(range(n)) - set(id_to_bytes))[:5]
        fail("model.vocab", f"ids 0..{n - 1} with no gaps", f"missing {missing}")
    vocab = [id_to_bytes[i] for i in range(n)]
    specials = set(special_ids.values())
    index = {tok: i for i, tok in enumerate(vocab) if i not in specials}
    if len(index) != n - len(specials):
        fail("model.vocab", "distinct tokens", "two ids with the same bytes")
    missing = [b for b in range(256) if bytes([b]) not in index]
    if missing:
        fail("model.vocab", "all 256 single-byte tokens", f"missing bytes {missing[:5]}")

    merges_json = model.get("merges")
    if not isinstance(merges_json, list):
        fail("model.merges", "a list of merges", merges_json)
    created = {i: -1 for i in (index[bytes([b])] for b in range(256))}  # id -> rank of the merge that made it
    merges = []
    for r, m in enumerate(merges_json):
        parts = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, str) for p in parts)):
            fail(f"model.merges[{r}]", "'left right' or [left, right]", m)
        if parts[0] not in vocab_json or parts[1] not in vocab_json:
            fail(f"model.merges[{r}]", "two tokens of model.vocab", m)
        a, b = vocab_json[parts[0]], vocab_json[parts[1]]
        new = index.get(vocab[a] + vocab[b])
        if new is None:
            fail(f"model.merges[{r}]", "a merge whose result is in model.vocab", m)
        # our encoder merges all occurrences of the best pair at once; that equals HF's
        # one-at-a-time rule only if each token is made once, after its parts
        if a not in created or b not in created or created[a] >= r or new in created:
            fail(f"model.merges[{r}]", "merges in creation order, each token made once, after its parts", m)
        created[new] = r
        merges.append((a, b))
    return vocab, merges, special_ids
