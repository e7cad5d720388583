"""The scope gate's recall and shut rate over benchmark facts: N facts of a dataset make one pack
(as a user's pack of facts would), then each item's paraphrase (`generality`) is asked, bare and
inside the chat template, and must open its edit; each item's locality prompt (another question
about the same subject) must stay shut. Also prints bench/gate_phrasing.py's figures. Needs only
the sentence encoder, not the backbone:

    PYTHONPATH=. .venv/bin/python bench/gate_recall.py                     # dev items 0-999
    PYTHONPATH=. .venv/bin/python bench/gate_recall.py --split test --n 1000

Tune on dev only (items 0-7,999); the test split is for reporting a chosen variant once.
`--cache FILE` keeps the encoder's embeddings on disk between runs (same encoder, same texts:
same figures, much faster when comparing variants of the rule). Timings are measured without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.gate_phrasing import ASKS, OTHERS, gated_set, opened, phrasing_results, render_chat
from server.evaluation.datasets import SPLITS, dataset_path, load_items
from server.gate.encoder import SentenceEncoder
from server.gate.table import GateTable
from server.packs.edit_set import EditSet
from server.settings import Settings

log = logging.getLogger("gate_recall")


class CachedEncoder(SentenceEncoder):
    """The gate's encoder with a disk cache of text -> embedding (for comparing rule variants)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.cache: dict[str, torch.Tensor] = torch.load(path) if path.is_file() else {}
        self.fresh = 0

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if missing:
            self.cache.update(zip(missing, super().encode(missing, batch_size), strict=True))
            self.fresh += len(missing)
        return torch.stack([self.cache[t] for t in texts]) if texts else super().encode([])

    def save(self) -> None:
        if self.fresh:
            torch.save(self.cache, self.path)


# Style flips of the datasets' own prompts (a statement asked as a question, a question put as a
# statement), as users cross styles: "The mother tongue of S is" -> "What is the mother tongue of
# S?". Hand-written, subject-aware; items whose prompt fits none are left out of the figure.
_AUX = r"(is|was|are|were)"
TO_QUESTION = (
    (r"^The (.+) of {S} {AUX}$", r"What \2 the \1 of {S}?"),
    (r"^{S}'s (.+) {AUX}$", r"What \2 {S}'s \1?"),
    (r"^{S},? {AUX} (.+ (?:in|at|on|by|of|from|to|as|for|with))$", r"What \1 {S} \2?"),
)
TO_STATEMENT = (
    (r"^What {AUX} the (.+) of {S}\?$", r"The \2 of {S} \1"),
    (r"^What {AUX} {S}'s (.+)\?$", r"{S}'s \2 \1"),
    (r"^(?:What|Who|Which \w+) {AUX} {S} (.+ (?:in|at|on|by|of|from|to|as|for|with))\?$",
     r"{S} \1 \2"),
)  # fmt: skip


def flip_style(text: str, subject: str) -> str | None:
    """The text in the other style (question <-> statement), or None where no template fits."""
    subject_re = re.escape(subject)
    for pattern, replacement in TO_STATEMENT if text.rstrip().endswith("?") else TO_QUESTION:
        pattern = pattern.replace("{S}", subject_re).replace("{AUX}", _AUX)
        match = re.match(pattern, text.strip())
        if match:
            flipped = match.expand(replacement.replace("{S}", subject.replace("\\", "\\\\")))
            return flipped[0].upper() + flipped[1:]
    return None


def rate(edit_set: EditSet, texts: Sequence[str], want_open: bool) -> tuple[float, float]:
    """(fraction that open (want_open) or stay shut, seconds per text)."""
    started = time.perf_counter()
    hits = sum(opened(edit_set, t) == want_open for t in texts)
    return hits / max(len(texts), 1), (time.perf_counter() - started) / max(len(texts), 1)


def table_bytes(table: GateTable) -> int:
    return sum(t.numel() * t.element_size() for t in table.to_tensors().values())


def dataset_figures(
    encoder: SentenceEncoder, dataset: str, split: str, n: int, offset: int, answer_rows: bool
) -> dict:
    items = load_items(dataset_path(Settings().data_dir, dataset), split, n, offset)  # type: ignore[arg-type]
    started = time.perf_counter()
    edit_set, table = gated_set(encoder, [it.fact for it in items], answer_rows=answer_rows)
    build_s = time.perf_counter() - started
    paraphrases = [it.generality for it in items if it.generality]
    localities = [it.locality_prompt for it in items if it.locality_prompt]
    bare, bare_s = rate(edit_set, paraphrases, True)
    chat, _ = rate(edit_set, [render_chat(p) for p in paraphrases], True)
    shut, shut_s = rate(edit_set, localities, False)
    chat_shut, _ = rate(edit_set, [render_chat(p) for p in localities], False)
    flipped_paraphrases = [
        flip_style(it.generality, it.fact.subject) for it in items if it.generality
    ]
    flipped_localities = [
        flip_style(it.locality_prompt, it.fact.subject) for it in items if it.locality_prompt
    ]
    flipped_paraphrases = [f for f in flipped_paraphrases if f]
    flipped_localities = [f for f in flipped_localities if f]
    flipped, _ = rate(edit_set, flipped_paraphrases, True)
    flipped_shut, _ = rate(edit_set, flipped_localities, False)
    return {
        "dataset": dataset,
        "items": f"{split}: items {SPLITS[split][0] + offset}-{SPLITS[split][0] + offset + n - 1}",
        "recall_bare": round(bare, 4),
        "recall_chat": round(chat, 4),
        "shut_locality": round(shut, 4),
        "shut_locality_chat": round(chat_shut, 4),
        "recall_flipped": round(flipped, 4),
        "shut_flipped": round(flipped_shut, 4),
        "flipped": f"{len(flipped_paraphrases)} paraphrases, {len(flipped_localities)} localities",
        "paraphrases": len(paraphrases),
        "localities": len(localities),
        "table_rows": int(table.fact_rows.numel()),
        "table_kib": round(table_bytes(table) / 1024, 1),
        "build_s": round(build_s, 2),
        "query_ms": round(1000 * (bare_s * len(paraphrases) + shut_s * len(localities))
                          / max(len(paraphrases) + len(localities), 1), 2),
    }  # fmt: skip


def phrasing_figures(encoder: SentenceEncoder, answer_rows: bool) -> dict:
    figures: dict = {"dataset": "gate_phrasing"}
    for form, (missed, wrongly) in phrasing_results(encoder, answer_rows=answer_rows).items():
        figures[f"recall_{form}"] = f"{len(ASKS) - len(missed)}/{len(ASKS)}"
        figures[f"shut_{form}"] = f"{len(OTHERS) - len(wrongly)}/{len(OTHERS)}"
        figures[f"missed_{form}"], figures[f"opened_wrongly_{form}"] = missed, wrongly
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["zsre", "counterfact"])
    parser.add_argument("--split", default="dev", choices=("dev", "test"))
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--cache", type=Path, help="disk cache of encoder embeddings")
    parser.add_argument("--no-phrasing", action="store_true")
    parser.add_argument(
        "--prompt-rows-only", action="store_true", help="no answer rows: the table as before"
    )
    args = parser.parse_args()
    answer_rows = not args.prompt_rows_only
    logging.basicConfig(level=logging.WARNING)
    encoder = CachedEncoder(args.cache) if args.cache else SentenceEncoder()
    for dataset in args.datasets:
        figures = dataset_figures(encoder, dataset, args.split, args.n, args.offset, answer_rows)
        print(json.dumps(figures))
    if not args.no_phrasing:
        print(json.dumps(phrasing_figures(encoder, answer_rows)))
    if isinstance(encoder, CachedEncoder):
        encoder.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
