"""Fitting the gate's relation head, on synthetic embeddings where the answer is known: the
relation lives in some dimensions, a nuisance (how a question is phrased) in others, and the
phrasing an edit prompt shares with another question about the subject fools raw cosine."""

import torch
import torch.nn.functional as F

from server.gate.encoder import SentenceEncoder
from server.gate.relation_head import RelationHead
from tools.relation_fit import (
    NearMisses,
    Probes,
    RelationExample,
    RelationPairs,
    auc,
    balanced_threshold,
    dropped_word_variants,
    fit_relation_head,
    pair_scores,
    relation_groups,
)

DIM, RELATIONS, PHRASINGS = 32, 6, 5


def _synthetic(n: int, seed: int) -> tuple[RelationPairs, Probes]:
    world = torch.Generator().manual_seed(0)  # the same relations and phrasings in every sample
    relation = torch.zeros(RELATIONS, DIM)
    relation[:, :16] = torch.randn(RELATIONS, 16, generator=world)
    phrasing = torch.zeros(PHRASINGS, DIM)
    phrasing[:, 16:] = 2.0 * torch.randn(PHRASINGS, 16, generator=world)  # louder than relation
    probe_vectors = F.normalize(torch.randn(8, DIM, generator=world), dim=-1)
    g = torch.Generator().manual_seed(seed)
    asked = torch.randint(0, RELATIONS, (n,), generator=g)
    other = (asked + torch.randint(1, RELATIONS, (n,), generator=g)) % RELATIONS
    style = torch.randint(0, PHRASINGS, (n,), generator=g)
    restyle = (style + torch.randint(1, PHRASINGS, (n,), generator=g)) % PHRASINGS

    def embed(r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        noise = 0.1 * torch.randn(len(r), DIM, generator=g)
        return F.normalize(relation[r] + phrasing[p] + noise, dim=-1)

    yes = torch.ones(n, dtype=torch.bool)
    pairs = RelationPairs(
        embed(asked, style), embed(asked, restyle), embed(other, style), yes, yes, yes
    )
    return pairs, Probes(probe_vectors, probe_vectors)


def test_fitted_head_separates_what_raw_cosine_confuses() -> None:
    train, probes = _synthetic(512, seed=0)
    held, _ = _synthetic(256, seed=1)
    before = auc(*pair_scores(torch.eye(DIM), held, probes))
    weight = fit_relation_head([train], probes, steps=300, batch_size=128, identity_weight=0.01)
    with torch.no_grad():
        after = auc(*pair_scores(weight, held, probes))
    assert before < 0.6, f"the synthetic task should fool raw cosine (auc {before:.3f})"
    assert after > 0.95, f"the fitted head should separate held-out pairs (auc {after:.3f})"


def test_fit_is_seeded() -> None:
    train, probes = _synthetic(64, seed=0)
    one = fit_relation_head([train], probes, steps=5, batch_size=16, seed=3)
    two = fit_relation_head([train], probes, steps=5, batch_size=16, seed=3)
    assert torch.equal(one, two)


def test_balanced_threshold_splits_separable_scores() -> None:
    positive, negative = torch.tensor([0.5, 0.6, 0.7]), torch.tensor([0.1, 0.2, 0.45])
    threshold = balanced_threshold(positive, negative)
    assert 0.45 < threshold <= 0.5
    assert auc(positive, negative) == 1.0


def test_head_round_trips_through_safetensors(tmp_path) -> None:
    head = RelationHead(torch.randn(DIM, DIM), threshold=0.123)
    head.save(tmp_path / "head.safetensors", {"note": "test"})
    loaded = RelationHead.load(tmp_path / "head.safetensors")
    assert torch.equal(loaded.weight, head.weight)
    assert abs(loaded.threshold - 0.123) < 1e-6
    unit = F.normalize(torch.randn(4, DIM), dim=-1)
    torch.testing.assert_close(RelationHead.identity(DIM).project(unit), unit)


def test_fits_on_real_encoder_output() -> None:
    """The encoder's tensors come from inference mode; fitting must still run on them."""
    encoder = SentenceEncoder(relation_head=RelationHead.identity(384))
    example = RelationExample(
        "Danielle Darrieux",
        "What is the native language of Danielle Darrieux?",
        "Which language is native to Danielle Darrieux?",
        "When was Danielle Darrieux born?",
    )
    pairs = RelationPairs.encode(encoder, [example, example])
    weight = fit_relation_head([pairs], Probes.encode(encoder), steps=2, batch_size=2)
    assert weight.shape == (384, 384)
    assert not torch.equal(weight, torch.eye(384))


def _templated(subject: str, prompt: str, paraphrase: str) -> RelationExample:
    fill = lambda template: template.replace("X", subject)  # noqa: E731
    return RelationExample(subject, fill(prompt), fill(paraphrase), f"When was {subject} born?")


# (example, target): two twin-city wordings linked only through a paraphrase, a "died in"
# relation, a "named after" relation in two wordings that no paraphrase links
TEMPLATED = [
    (_templated("Kyoto", "The twin city of X is", "X is a twin city of"), "Kiev"),
    (_templated("Lyon", "X is a twin city of", "What is the twin city of X? It is"), "Prague"),
    (_templated("Marie Curie", "X died in", "X passed away in"), "Paris"),
    (_templated("Leo Tolstoy", "X passed away in", "X's life ended in"), "Moscow"),
    (_templated("Victoria Park", "X, named after", "X, which is named after"), "Victoria"),
    (_templated("St Peter Port", "X was named after", "X was called after"), "Peter"),
]


def test_relation_groups_link_paraphrases_and_keep_relations_apart() -> None:
    encoder = SentenceEncoder(relation_head=RelationHead.identity(384))
    examples, targets = zip(*TEMPLATED, strict=True)
    groups = relation_groups(examples, targets, encoder)
    assert groups["The twin city of X is"] == groups["X is a twin city of"]  # via a paraphrase
    assert groups["X died in"] == groups["X passed away in"]
    # near-identical wordings merge even though no paraphrase links them
    assert groups["X, named after"] == groups["X was named after"]
    assert groups["X is a twin city of"] != groups["X died in"]
    assert groups["X died in"] != groups["X was named after"]
    # relations whose targets look alike merge: a split relation would become its own negative
    merged = relation_groups(examples, ["Paris"] * len(examples), encoder)
    assert len(set(merged.values())) == 1


def test_near_misses_come_from_another_relation_with_the_subject() -> None:
    encoder = SentenceEncoder(relation_head=RelationHead.identity(384))
    examples, targets = zip(*TEMPLATED, strict=True)
    groups = relation_groups(examples, targets, encoder)
    mask = lambda example, text: text.replace(example.subject, "X")  # noqa: E731
    for drop_words in (False, True):
        near_misses = NearMisses.find(groups, encoder, per_template=2, drop_words=drop_words)
        mined = near_misses.examples(examples)
        assert len(mined) == len(examples)
        for example, near in zip(examples, mined, strict=True):
            assert (near.subject, near.prompt, near.paraphrase) == (
                example.subject,
                example.prompt,
                example.paraphrase,
            )
            assert example.subject in near.other
            own_group = groups[mask(example, example.prompt)]
            template = mask(example, near.other)
            if template in groups:
                assert groups[template] != own_group
            else:  # a real template less one word, never one of its own relation's wordings
                assert drop_words
                sources = [t for t in groups if template in dropped_word_variants(t)]
                assert sources, f"{template!r} is neither a template nor a variant of one"
                # ... and it does not read like any real template (a paraphrase in disguise)
                closest = (encoder.encode([template]) @ encoder.encode(list(groups)).T).max()
                assert closest <= 0.9, f"{template!r} reads like a template ({closest:.2f})"


def test_dropped_word_variants_keep_function_words_and_the_subject() -> None:
    assert dropped_word_variants("X is a twin city of") == ["X is a city of", "X is a twin of"]
    assert dropped_word_variants("What is the capital of X?") == ["What is the of X?"]
    assert dropped_word_variants("X is in") == []
