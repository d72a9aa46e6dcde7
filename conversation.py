"""A chat with the model: its messages, and the decoding state that has read them.
The REPL (chat.py) and the web chat (web.py) hold one each.

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
from collections import deque

from sampling import generate
from tokenizer import DEFAULT_SYSTEM


class Conversation:
    """One chat: its messages (unless transcript=False) and the decoding state that has read them.

    `pending` holds the ids that belong in the state before the next user turn:
    the system block at first; after a reply, <|im_end|>\\n (plus the reply's last
    token if it was cut short). `state.pos` is the number of tokens read so far.
    """

    def __init__(self, model, tok, system=DEFAULT_SYSTEM, transcript=True):
        if tok.im_start_id is None or tok.im_end_id is None:
            raise ValueError("this tokenizer has no <|im_start|>/<|im_end|> tokens, so it cannot chat; "
                             "use --raw to continue plain text")
        self.model, self.tok = model, tok
        self.stop_ids = {i for i in (tok.im_end_id, tok.eot_id) if i is not None}
        # `<|im_start|>assistant\n` exactly as the template renders the generation prompt
        self.assistant_prefix = tok.render_chat([], add_generation_prompt=True)[0][len(tok.render_chat([])[0]):]
        self.system = system
        self.transcript = transcript  # False: `messages` stays None, for a server that never reads it
        self.reset()

    def reset(self, system=None):
        """Start over (with a new system prompt if given)."""
        if system is not None:
            self.system = system
        self.messages = [{"role": "system", "content": self.system}] if self.transcript else None
        self.state = self.model.init_state(1)
        self.pending = self.tok.render_message("system", self.system)[0]
        self.recent = deque()

    def turn(self, text, settings, rng):
        """Feed the user's message, then yield the reply as text pieces while it is
        sampled (whole UTF-8 characters only). Closing this generator early (Ctrl-C, a
        client gone) ends the reply there; the transcript and the state stay in step."""
        user = self.tok.render_message("user", text)[0]   # the text is encoded as text: no special ids
        prompt = self.pending + user + self.assistant_prefix
        if self.messages is not None:
            self.messages.append({"role": "user", "content": text})
        if self.recent.maxlen != settings.penalty_window:
            self.recent = deque(self.recent, maxlen=settings.penalty_window)
        reply, last, decoder = [], None, self.tok.stream_decoder()
        try:
            for last in generate(self.model, self.tok, self.state, prompt, settings, rng, self.stop_ids, self.recent):
                if last in self.stop_ids:
                    break
                if self.messages is not None:
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
            if self.messages is not None:
                self.messages.append({"role": "assistant", "content": self.tok.decode(reply)})

    def reply(self, text, settings, rng):
        """The whole reply as one string."""
        return "".join(self.turn(text, settings, rng))
