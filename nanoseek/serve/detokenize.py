"""From generated token ids to what a client reads: text deltas, the reasoning split, stop strings.

- Text arrives in deltas as tokens do (`nanoseek.inference.cli.TextStream`: an incomplete UTF-8
  character is held back until it is whole).
- Stop strings are not part of the returned text (OpenAI's rule). While the text ends in something that
  could still grow into a stop string, that tail is held back; once a stop string appears, the text is
  cut where it begins.
- Chat replies: the `<think> ... </think>` part is `reasoning_content`, the rest `content`, as in
  DeepSeek's API. The tags are single tokens, so the split is by token; `<answer>`/`</answer>` tags are
  dropped from `content`, control tokens (`<|eos|>`) from both. Completions (`/v1/completions`) return
  the raw text, tags included.
- Log-probability entries name each token by its text and its exact bytes (byte-level BPE: a token may be
  part of a UTF-8 character).
"""

from __future__ import annotations

from functools import lru_cache

from nanoseek.data.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK, Tokenizer
from nanoseek.inference.cli import TextStream


class TextDeltas:
    """Incremental text of one stream of tokens, with stop strings held back and cut."""

    def __init__(self, decode, stops: list[str]):
        self.stream, self.stops = TextStream(decode), list(stops)
        self.text, self.sent, self.cut = "", 0, False

    def push(self, token: int) -> str:
        if self.cut:
            return ""
        self.text += self.stream.push(token)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.cut:
            self.text += self.stream.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.cut = True
            self.text = self.text[:min(hits)]
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._held()
        end = max(end, self.sent)
        delta, self.sent = self.text[self.sent:end], end
        return delta

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


class ChatText:
    """One chat choice: tokens in, (reasoning delta, content delta) out; counts reasoning tokens
    (`<think>` through `</think>`, tags included)."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        decode = _text_decoder(tokenizer)
        self.reasoning, self.content = TextDeltas(decode, stops), TextDeltas(decode, stops)
        self.think, self.end_think = tokenizer.token_id(THINK), tokenizer.token_id(END_THINK)
        self.dropped = {tokenizer.token_id(ANSWER), tokenizer.token_id(END_ANSWER)}
        self.in_reasoning = False
        self.reasoning_tokens = 0

    def push(self, token: int) -> tuple[str, str]:
        if token == self.think and not self.in_reasoning:
            self.in_reasoning = True
            self.reasoning_tokens += 1
            return "", ""
        if self.in_reasoning:
            self.reasoning_tokens += 1
            if token == self.end_think:
                self.in_reasoning = False
                return self.reasoning.finish(), ""
            return self.reasoning.push(token), ""
        if token in self.dropped:
            return "", ""
        return "", self.content.push(token)

    def finish(self) -> tuple[str, str]:
        return (self.reasoning.finish() if self.in_reasoning else ""), self.content.finish()


class CompletionText:
    """One completion choice: the raw text (reasoning tags kept, control tokens dropped)."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.text = TextDeltas(_text_decoder(tokenizer), stops)

    def push(self, token: int) -> str:
        return self.text.push(token)

    def finish(self) -> str:
        return self.text.finish()

    @property
    def length(self) -> int:
        return self.text.sent


def _text_decoder(tokenizer: Tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special=True)


# ---------------------------------------------------------------------------------------------- token bytes
def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE spells each byte as one printable character: bytes that are printable Latin-1 stand
    for themselves, the others (controls, space, ...) are shifted to code points from 256 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    for n, b in enumerate(shifted):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


_BYTES_OF_CHAR = _byte_alphabet()


class TokenNames:
    """Text and bytes of single tokens, for log-probability entries (cached per id)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.added = {i: t.content for i, t in tokenizer.backend.get_added_tokens_decoder().items()}
        self.bytes = lru_cache(maxsize=None)(self._bytes)

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")

    def _bytes(self, token: int) -> bytes:
        if token in self.added:
            return self.added[token].encode()
        piece = self.tok.backend.id_to_token(token)
        if piece is None:
            return b""
        try:
            return bytes(_BYTES_OF_CHAR[c] for c in piece)
        except KeyError:  # not a byte-level vocabulary: the piece is the text
            return piece.encode()
