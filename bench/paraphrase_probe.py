"""Does the served model paraphrase a prompt when asked to (a source of training forms)? Prints
its greedy chat answers to two instructions for zsRE dev items 6,000-6,009:

    PYTHONPATH=. .venv/bin/python bench/paraphrase_probe.py
"""

from __future__ import annotations

from server.evaluation.datasets import dataset_path, load_items
from server.model import load_backbone
from server.settings import Settings

INSTRUCTIONS = (
    "Rephrase this question in other words: {q}",
    "Ask the same question in a different way: {q}",
)


def main() -> None:
    settings = Settings()
    backbone = load_backbone(settings)
    tokenizer, model = backbone.tokenizer, backbone.model
    for item in load_items(dataset_path(settings.data_dir, "zsre"), "dev", 10, 6000):
        for instruction in INSTRUCTIONS:
            content = instruction.format(q=item.fact.prompt)
            text = backbone.render_chat([{"role": "user", "content": content}])
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
            out = model.generate(ids, max_new_tokens=30, do_sample=False)
            answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            print(f"{item.fact.prompt!r} => {answer!r}")


if __name__ == "__main__":
    main()
