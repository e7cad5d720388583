"""Finding edited subjects in a prompt: an Aho-Corasick automaton over subjects and aliases, so
the cost depends on the prompt's length, not on how many subjects a pack edits."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import ahocorasick

from server.editor.facts import MIN_SUBJECT_CHARS


@dataclass(frozen=True)
class SubjectMatch:
    start: int  # character span of the match in the text
    end: int
    row: int  # which subject (row of the pack's table)


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def _longest_without_overlap(candidates: list[SubjectMatch]) -> list[SubjectMatch]:
    """Longest first, then leftmost; keep each candidate that overlaps nothing kept before.
    The kept spans never overlap, so one list ordered by start answers each overlap question
    by bisection: O(M log M) for M candidates (a prompt may repeat a subject thousands of
    times)."""
    candidates.sort(key=lambda m: (-(m.end - m.start), m.start))
    starts: list[int] = []
    chosen: list[SubjectMatch] = []  # ordered by start, like `starts`
    for match in candidates:
        at = bisect.bisect_right(starts, match.start)
        if at > 0 and chosen[at - 1].end > match.start:
            continue
        if at < len(chosen) and chosen[at].start < match.end:
            continue
        starts.insert(at, match.start)
        chosen.insert(at, match)
    return chosen


class SubjectIndex:
    """Subjects and aliases -> table rows. Word-boundary aware, longest match first, several
    subjects per prompt, optionally case-insensitive."""

    def __init__(self, names: Iterable[tuple[str, int]], *, case_insensitive: bool = False) -> None:
        self.case_insensitive = case_insensitive
        self._automaton = ahocorasick.Automaton()
        count = 0
        for name, row in names:
            key = self._normalise(name)
            if len(key.strip()) < MIN_SUBJECT_CHARS:  # a shorter alias would match everywhere
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
        return _longest_without_overlap(candidates)


class TokenPositions:
    """Character spans -> token positions for one tokenised text, by bisection when the token
    offsets are in order (they are, but for some special tokens): a prompt that names a
    subject thousands of times costs a log per match, not a scan."""

    def __init__(self, offsets: Sequence[tuple[int, int]]) -> None:
        self.offsets = offsets
        starts = [start for start, _ in offsets]
        ordered = all(a <= b for a, b in itertools.pairwise(starts))
        self._starts = starts if ordered else None

    def last_token(self, start: int, end: int) -> int:
        """Index of the token holding the span's last character (see `last_token_position`)."""
        if self._starts is not None:
            index = bisect.bisect_right(self._starts, end - 1) - 1
            if index >= 0 and self.offsets[index][0] <= end - 1 < self.offsets[index][1]:
                return index
        return last_token_position(self.offsets, start, end)


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
