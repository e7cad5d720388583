"""Text from a growing list of token ids, at a constant cost per token.

Decoding the whole output again for every new token costs O(n) per token, O(n^2) per request.
Instead (as vLLM does) each token is decoded in a window that starts one token back: the text
of the window minus the text of its first token is the new text. The context token keeps
tokenizers that drop a word's leading space at the start of a decode, or that join bytes across
tokens, exact; a window that ends inside a multi-byte character (U+FFFD) waits for the next
token.

Stop strings are found the same way: only where the newest text can have completed one.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # the window starts here
        self._read = 0  # ids[:_read] are in `text`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add a token; returns the text it completes ("" while a character is incomplete)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of a generation: the text still held back, incomplete character and all."""
        return self._advance(final=True) if self._read < len(self.ids) else ""

    def _advance(self, *, final: bool) -> str:
        before = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        if len(window) <= len(before) or (window.endswith(REPLACEMENT) and not final):
            return ""
        delta = window[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta


# Stop strings: searched in the text as it grows, held back while they may still complete.


def first_stop(text: str, stops: Sequence[str], new: int) -> int:
    """Where the first stop string starts in `text`, looking only where the last `new`
    characters can have completed one (earlier text was searched before); -1 if none."""
    found = []
    for stop in stops:
        index = text.find(stop, max(0, len(text) - new - len(stop) + 1))
        if index >= 0:
            found.append(index)
    return min(found, default=-1)


def stop_prefix_at_end(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop` (and may yet become it)."""
    tail = text[max(0, len(text) - len(stop) + 1) :] if len(stop) > 1 else ""
    start = tail.find(stop[0])
    while start >= 0:
        if stop.startswith(tail[start:]):
            return len(tail) - start
        start = tail.find(stop[0], start + 1)
    return 0
