"""From next-token logits to text: the sampler and generation, as chat.py and
train.py's reports use them.

The sampler is the spec's: repetition penalty -> temperature -> top-k -> top-p ->
draw, with the reference run's defaults (temperature 0.7, top-k 50, top-p 0.9,
repetition penalty 1.1). `generate` feeds a prompt to a model's O(1) decoding
state (wyrd.Chimera.step) and yields sampled ids one at a time.
"""
import dataclasses
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

PREFILL_CHUNK = 512  # prompt tokens per model.step call: bounds the activations of a long paste


@dataclass(frozen=True)
class Settings:
    """How replies are sampled. The defaults are the spec's reference run."""
    temperature: float = 0.7         # 0 = greedy (argmax)
    top_k: int = 50                  # keep the k most likely tokens; 0 = all
    top_p: float = 0.9               # then the smallest set holding this much probability; 1 = all
    repetition_penalty: float = 1.1  # 1 = off
    penalty_window: int = 64         # how many recent context tokens the penalty looks at
    max_tokens: int = 512            # per reply
    seed: int | None = None          # None = a fresh random seed

    def __post_init__(self):
        def bad(name, rule):
            raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        big = 1 << 20  # bounds that keep every setting a valid C size (deque, arrays)
        if not 0 <= self.temperature < math.inf:  # also rejects NaN
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or not 0 <= self.top_k <= 1 << 31:
            bad("top_k", f"an integer in [0, {1 << 31}] (0 = off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1] (1 = off)")
        if not 0 < self.repetition_penalty < math.inf:
            bad("repetition_penalty", "a finite number > 0 (1 = off)")
        if not is_int(self.penalty_window) or not 0 <= self.penalty_window <= big:
            bad("penalty_window", f"an integer in [0, {big}]")
        if not is_int(self.max_tokens) or not 1 <= self.max_tokens <= big:
            bad("max_tokens", f"an integer in [1, {big}]")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 1 << 63):
            bad("seed", "an integer in [0, 2^63) or none")

    def with_value(self, name, text):
        """A copy with one setting changed from its text form (the REPL's /set)."""
        name = name.replace("-", "_")
        kinds = {f.name: f.type for f in dataclasses.fields(self)}
        if name not in kinds:
            raise ValueError(f"unknown setting {name!r}; known: {', '.join(kinds)}")
        try:
            if name == "seed" and text.lower() in ("none", "random"):
                value = None
            else:
                value = float(text) if kinds[name] is float else int(text)
        except ValueError:
            raise ValueError(f"{name} needs {'a number' if kinds[name] is float else 'an integer'}, "
                             f"got {text!r}") from None
        return dataclasses.replace(self, **{name: value})

    def describe(self):
        return "  ".join(f"{k} {v}" for k, v in dataclasses.asdict(self).items())


def apply_repetition_penalty(logits, recent_ids, penalty):
    """The standard rule (CTRL, Keskar et al. 2019; also Hugging Face's): each token id in
    recent_ids has its logit divided by the penalty if positive and multiplied by it if
    negative, so with penalty > 1 it becomes less likely either way. A token counts once
    however often it appeared."""
    ids = np.unique(np.fromiter(recent_ids, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < len(logits))]
    if penalty == 1 or len(ids) == 0:
        return logits
    out = logits.copy()
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def top_k_ids(logits, k):
    """Ids of the k largest logits, largest first (all ids when k is 0 or >= the vocabulary)."""
    ids = np.argpartition(-logits, k - 1)[:k] if 0 < k < len(logits) else np.arange(len(logits))
    return ids[np.argsort(-logits[ids], kind="stable")]


def top_p_count(probs, p):
    """How many of probs (sorted, largest first) form the nucleus: the fewest whose
    sum reaches p (Holtzman et al. 2019). Always at least one."""
    if p >= 1:
        return len(probs)
    return min(int(np.searchsorted(np.cumsum(probs), p)) + 1, len(probs))


def sample(logits, rng, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1, recent_ids=()):
    """One token id from next-token logits [V].

    rng: np.random.Generator. recent_ids: the ids the repetition penalty applies to
    (the caller picks the window). temperature 0 is greedy: the argmax after the
    penalty, ignoring top-k and top-p.
    """
    logits = apply_repetition_penalty(np.asarray(logits, dtype=np.float64), recent_ids, repetition_penalty)
    if temperature == 0:
        return int(np.argmax(logits))
    ids = top_k_ids(logits, top_k)                   # candidates, most likely first
    z = logits[ids] / temperature
    probs = np.exp(z - z[0])                         # z[0] is the max: softmax without overflow
    probs /= probs.sum()
    n = top_p_count(probs, top_p)
    cdf = np.cumsum(probs[:n])
    pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))  # inverse CDF
    return int(ids[min(pick, n - 1)])


# ---------------------------------------------------------------------------
# Generation


def generate(model, tok, state, prompt_ids, settings=None, rng=None, stop_ids=None, recent_ids=None):
    """Feed prompt_ids to the model, then sample and yield new token ids one at a time.

    model       a wyrd.Chimera (anything with init_state(1) and step(ids [1, n], state) -> logits [1, V])
    tok         its Tokenizer: gives the default stop ids and caps sampling to its vocabulary; may be None
    state       the DecodeState to continue, advanced in place; None = a fresh one
    prompt_ids  the ids to feed first (at least one)
    settings    a Settings (sampling, max_tokens); default Settings()
    rng         a np.random.Generator; default np.random.default_rng(settings.seed)
    stop_ids    ids that end the text; default <|im_end|> and <|endoftext|> of tok
    recent_ids  a deque of earlier context ids for the repetition penalty (a conversation
                keeps one across turns); the prompt and each new id are appended to it.
                Default: a new deque(maxlen=settings.penalty_window).

    Stops after yielding a stop id or settings.max_tokens ids. The last id yielded is
    never fed to `state` (no logits are needed after it): feed it yourself to go on.
    Closing the generator early leaves `state` whole, holding every id yielded but the last.

        ids = tok.encode("Once upon a time")
        story = tok.decode(t for t in generate(model, tok, None, ids) if t != tok.eot_id)
    """
    settings = settings or Settings()
    rng = rng if rng is not None else np.random.default_rng(settings.seed)
    if stop_ids is None:
        stop_ids = {i for i in (tok.im_end_id, tok.eot_id) if i is not None} if tok is not None else set()
    state = state if state is not None else model.init_state(1)
    recent_ids = recent_ids if recent_ids is not None else deque(maxlen=settings.penalty_window)
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt id (e.g. tok.eot_id to start a new text)")
    vocab = tok.vocab_size if tok is not None else None   # a model may pad its vocabulary
    for i in range(0, len(prompt_ids), PREFILL_CHUNK):
        logits = model.step(np.asarray([prompt_ids[i:i + PREFILL_CHUNK]]), state)[0]
    recent_ids.extend(prompt_ids)
    for n in range(1, settings.max_tokens + 1):
        next_id = sample(logits[:vocab], rng, settings.temperature, settings.top_k, settings.top_p,
                         settings.repetition_penalty, recent_ids)
        recent_ids.append(next_id)
        yield next_id
        if next_id in stop_ids or n == settings.max_tokens:
            return
        logits = model.step(np.asarray([[next_id]]), state)[0]


def complete(model, tok, text, settings=None, rng=None):
    """Continue plain text, no chat template (story completion); yields text pieces.
    The text starts a new document, after <|endoftext|> as in pretraining."""
    ids = ([tok.eot_id] if tok.eot_id is not None else []) + tok.encode(text)
    decoder = tok.stream_decoder()
    for t in generate(model, tok, None, ids, settings, rng):
        if t in (tok.eot_id, tok.im_end_id):
            break
        piece = decoder.push(t)
        if piece:
            yield piece
    yield decoder.flush()
