"""Time the teacher's generation for 100 zsRE dev facts and evaluation's chat answers to their
questions (natural_edits.md 2q), and save both so two commits' can be compared: tokens equal,
final states close.

    PYTHONPATH=. .venv/bin/python bench/teacher_generation.py OUT.pt [--compare OTHER.pt]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

from server.editor.answers import MAX_ANSWER_TOKENS, encode_texts, generate, render
from server.editor.sequences import _teacher_texts
from server.evaluation.datasets import dataset_path, load_items
from server.model.loading import load_backbone
from server.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--compare")
    args = parser.parse_args()
    settings = Settings(dtype="float32")
    backbone = load_backbone(settings)
    items = load_items(dataset_path(settings.data_dir, "zsre"), "dev", 100)
    jobs = [_teacher_texts(backbone, it.fact, c) for it in items for c in ("chat", "bare")]
    teachers = encode_texts(backbone, [(t, templated) for _, _, t, templated, _ in jobs], None)
    print("prompt tokens", sum(len(t.ids) for t in teachers))
    for tokens in (1, 24):
        started = time.perf_counter()
        answers = generate(
            backbone, teachers, None, tokens, 64, final_states=True, share_prefix=True
        )
        print(
            f"{tokens} tokens: {time.perf_counter() - started:.1f} s, "
            f"{sum(len(a.tokens) for a in answers)} generated"
        )
    lengths = Counter(len(a.tokens) for a in answers)
    print(f"teacher answers by length (tokens: answers), commonest first: {lengths.most_common(4)}")
    # evaluation's chat answers (unedited): 40 tokens, no shared prefix, as `lks eval` asks
    asked = encode_texts(backbone, [render(backbone, "chat", it.fact.prompt) for it in items], None)
    started = time.perf_counter()
    chat = generate(backbone, asked, None, MAX_ANSWER_TOKENS)
    print(
        f"evaluation's chat answers: {time.perf_counter() - started:.1f} s, "
        f"{sum(len(a.tokens) for a in chat)} generated"
    )
    saved = {
        "chat": [list(a.tokens) for a in chat],
        "tokens": [list(a.tokens) for a in answers],
        "states": [a.states for a in answers],
    }
    torch.save(saved, args.out)
    if args.compare:
        other = torch.load(args.compare)
        same = sum(a == b for a, b in zip(saved["tokens"], other["tokens"], strict=True))
        diff = max(
            (a - b).abs().max().item()
            for a, b in zip(saved["states"], other["states"], strict=True)
            if a is not None and b is not None and a.shape == b.shape
        )
        chat_same = sum(a == b for a, b in zip(saved["chat"], other["chat"], strict=True))
        print(f"chat answers with the same tokens: {chat_same} of {len(chat)}")
        print(f"teacher answers with the same tokens: {same} of {len(answers)}")
        print(f"largest difference of their final states: {diff:.1e}")


if __name__ == "__main__":
    main()
