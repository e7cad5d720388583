"""Text from a growing list of token ids, at a constant cost per token.

Decoding the whole output again for every new token costs O(n) per token, O(n^2) per request.
Instead (as vLLM does) each token is decoded in a window that starts one token back: the text
of the window minus the text of its first token is the new text. The context token keeps
tokenizers that drop a word's leading space at the start of a decode, or that join bytes across
tokens, exact; a window that ends inside a multi-byte character (U+FFFD) waits for the next
token.
"""

from __future__ import annotations

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
