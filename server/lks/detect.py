"""Finding edited subjects in a prompt: an Aho-Corasick automaton over subjects and aliases, so
the cost depends on the prompt's length, not on how many subjects a pack edits."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import ahocorasick


@dataclass(frozen=True)
class SubjectMatch:
    start: int  # character span of the match in the text
    end: int
    row: int  # which subject (row of the pack's table)


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


class SubjectIndex:
    """Subjects and aliases -> table rows. Word-boundary aware, longest match first, several
    subjects per prompt, optionally case-insensitive."""

    def __init__(self, names: Iterable[tuple[str, int]], *, case_insensitive: bool = False) -> None:
        self.case_insensitive = case_insensitive
        self._automaton = ahocorasick.Automaton()
        count = 0
        for name, row in names:
            key = self._normalise(name)
            if not key:
                continue
            # a name shared by two subjects keeps the first row (the earlier subject wins)
            if key not in self._automaton:
                self._automaton.add_word(key, (len(key), row))
                count += 1
        self.size = count
        if count:
            self._automaton.make_automaton()

    def _normalise(self, text: str) -> str:
        return text.lower() if self.case_insensitive else text

    def find(self, text: str) -> list[SubjectMatch]:
        if not self.size:
            return []
        haystack = self._normalise(text)
        if len(haystack) != len(text):  # lowering changed lengths (e.g. 'İ'): spans would drift
            haystack = text
        candidates: list[SubjectMatch] = []
        for end_index, (length, row) in self._automaton.iter(haystack):
            start, end = end_index - length + 1, end_index + 1
            if _is_word_char(text[start]) and start > 0 and _is_word_char(text[start - 1]):
                continue
            if _is_word_char(text[end - 1]) and end < len(text) and _is_word_char(text[end]):
                continue
            candidates.append(SubjectMatch(start, end, row))
        # longest first, then leftmost; keep the ones that overlap nothing kept before
        candidates.sort(key=lambda m: (-(m.end - m.start), m.start))
        chosen: list[SubjectMatch] = []
        for match in candidates:
            if all(match.end <= c.start or match.start >= c.end for c in chosen):
                chosen.append(match)
        return sorted(chosen, key=lambda m: m.start)


def last_token_position(offsets: Sequence[tuple[int, int]], start: int, end: int) -> int:
    """Index of the token holding the span's last character (the subject's "knowledge block").

    Works when that token also holds following punctuation or a leading space.
    """
    last_char = end - 1
    for index in range(len(offsets) - 1, -1, -1):
        token_start, token_end = offsets[index]
        if token_start <= last_char < token_end:
            return index
    for index in range(len(offsets) - 1, -1, -1):  # tokenizers that drop characters (spaces)
        token_start, token_end = offsets[index]
        if token_end > start and token_start < end:
            return index
    raise ValueError(f"no token covers characters {start}..{end}")
