"""Building a pack version (`lks.build`): the one path of the worker, `lks train` and the
benchmarks, each step of its policy on and off, on the tiny model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from factories import TINY_FACTS, TINY_TRAIN, make_backbone_info, make_content

from server.builder.edits import backbone_info
from server.builder.version import (
    BuildPolicy,
    Candidate,
    StartingPoint,
    build_version,
    latest_start,
    probe_locality,
)
from server.editor.hypernet import Hypernetwork
from server.gate.encoder import SentenceEncoder
from server.model import Backbone, load_backbone
from server.packs import PackRef, PackStore
from server.packs.edit_set import EditSet
from server.packs.format import BLOCKS_KEY, SubjectEntry
from server.settings import Settings

FACTS = TINY_FACTS
LENIENT = BuildPolicy(train=TINY_TRAIN, min_reliability=0.0, growth_check_sample=0)


@pytest.fixture(scope="module")
def backbone(tiny_model_dirs: dict[str, Path]) -> Backbone:
    return load_backbone(Settings(model=tiny_model_dirs["llama"], device="cpu"))


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


@pytest.fixture(scope="module")
def first_version(
    backbone: Backbone, encoder: SentenceEncoder, tmp_path_factory: pytest.TempPathFactory
) -> PackStore:
    """A store whose pack `demo` has one version, of the first fact only."""
    store = PackStore(tmp_path_factory.mktemp("packs"))
    candidate = build_version(backbone, FACTS[:1], encoder, None, LENIENT)
    assert candidate.rejection is None
    store.publish("demo", candidate.content, backbone_info(backbone))
    return store


def grow(
    backbone: Backbone, encoder: SentenceEncoder, store: PackStore, **policy: object
) -> Candidate:
    start = latest_start(store, "demo", backbone, TINY_TRAIN)
    return build_version(backbone, FACTS, encoder, start, replace(LENIENT, **policy))  # type: ignore[arg-type]


def test_a_grown_set_applies_the_previous_weights_and_reuses_its_parts(
    backbone: Backbone, encoder: SentenceEncoder, first_version: PackStore
) -> None:
    candidate = grow(backbone, encoder, first_version)
    assert candidate.rejection is None
    assert candidate.metrics["warm_start"] == 1.0
    assert candidate.metrics["trained_facts"] == 0  # the weights as they are
    assert candidate.metrics["checked_facts"] == 1  # the new fact; the reused one is known good
    assert candidate.content.training["epochs"] == candidate.content.training["epochs_run"] == 0
    previous = first_version.load(PackRef("demo", 1))
    assert torch.equal(candidate.content.table["blocks"][0], previous.content.table["blocks"][0])


@pytest.mark.parametrize(
    ("policy", "warm", "trained", "checked"),
    [
        ({"growth": False}, 1.0, 2, 2),  # warm-started training on every fact, all checked
        ({"warm_start": False}, 0.0, 2, 2),  # from scratch
        ({"reuse": False}, 1.0, 0, 2),  # nothing known: every fact is new to the check
    ],
)
def test_each_step_of_the_policy_can_be_turned_off(
    backbone: Backbone,
    encoder: SentenceEncoder,
    first_version: PackStore,
    policy: dict[str, bool],
    warm: float,
    trained: int,
    checked: int,
) -> None:
    candidate = grow(backbone, encoder, first_version, **policy)
    assert candidate.rejection is None
    measured = candidate.metrics
    assert (measured["warm_start"], measured["trained_facts"], measured["checked_facts"]) == (
        warm,
        trained,
        checked,
    )


def test_a_version_trained_with_the_linear_map_starts_a_residual_build(
    backbone: Backbone, encoder: SentenceEncoder, tmp_path: Path
) -> None:
    """Packs published before the residual default grow from their weights: applied as they
    are, the blocks are the linear map's; a warm-started training runs from them."""
    assert TINY_TRAIN.hypernet == "residual"
    store = PackStore(tmp_path)
    linear = replace(LENIENT, train=replace(TINY_TRAIN, hypernet="linear"))
    first = build_version(backbone, FACTS[:1], encoder, None, linear)
    assert first.content.training["hypernet"] == "linear"
    store.publish("demo", first.content, backbone_info(backbone))

    trained = grow(backbone, encoder, store, growth=False)
    assert (trained.metrics["warm_start"], trained.metrics["trained_facts"]) == (1.0, 2)
    applied = grow(backbone, encoder, store)
    assert (applied.metrics["warm_start"], applied.metrics["trained_facts"]) == (1.0, 0)
    blocks = applied.content.table[BLOCKS_KEY]
    assert torch.equal(blocks[0], first.content.table[BLOCKS_KEY][0])
    store.publish("demo", applied.content, backbone_info(backbone))
    grown = store.load(PackRef("demo", 2)).content
    assert grown.training["hypernet"] == "residual"
    assert grown.hypernet["net.weight"].any() and not grown.hypernet["branch.2.weight"].any()


def test_the_quality_gate_refuses_and_can_be_skipped(
    backbone: Backbone, encoder: SentenceEncoder, first_version: PackStore
) -> None:
    refused = grow(backbone, encoder, first_version, min_reliability=1.01)
    assert refused.rejection is not None and "quality gate" in refused.rejection
    assert refused.metrics["trained_facts"] == 2  # the previous weights missed: it trained
    skipped = grow(backbone, encoder, first_version, min_reliability=1.01, quality_gate=False)
    assert skipped.rejection is None
    assert "reliability" not in skipped.metrics and skipped.metrics["checked_facts"] == 0


def test_a_version_of_another_backbone_or_layer_is_no_starting_point(
    backbone: Backbone, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = PackStore(tmp_path)
    content = make_content(subjects=2, hidden=backbone.hidden_size, layer=1)
    facts = [f.model_dump() for f in FACTS]
    weights = Hypernetwork(backbone.hidden_size, TINY_TRAIN.hypernet).state_dict()
    training = {"hypernet": TINY_TRAIN.hypernet}
    content = replace(content, facts=facts, training=training, hypernet=weights)
    store.publish("other", content, make_backbone_info())  # another fingerprint
    with caplog.at_level("INFO", logger="server.builder.version"):
        assert latest_start(store, "other", backbone, TINY_TRAIN) is None
    assert "was built for backbone" in caplog.text  # format.check_compatible said why
    store.publish("ours", content, backbone_info(backbone))
    assert isinstance(latest_start(store, "ours", backbone, TINY_TRAIN), StartingPoint)
    assert latest_start(store, "ours", backbone, replace(TINY_TRAIN, layer=0)) is None
    assert latest_start(store, "ours", backbone, replace(TINY_TRAIN, hypernet="mlp")) is None
    assert latest_start(store, "none", backbone, TINY_TRAIN) is None
    linear = Hypernetwork(backbone.hidden_size, "linear").state_dict()
    older = replace(content, training={"hypernet": "linear"}, hypernet=linear)
    store.publish("older", older, backbone_info(backbone))  # before the residual default
    start = latest_start(store, "older", backbone, replace(TINY_TRAIN, hypernet="residual"))
    assert start is not None and start.weights.keys() == linear.keys()
    assert latest_start(store, "older", backbone, replace(TINY_TRAIN, hypernet="mlp")) is None


def test_a_build_trains_on_the_training_backbone_and_checks_on_the_served_one(
    backbone: Backbone, encoder: SentenceEncoder, tiny_model_dirs: dict[str, Path]
) -> None:
    """A bfloat16 server trains on a copy (here float32): the blocks are those of a float32
    build, not of one trained in bfloat16, and the quality gate checks the bfloat16 model it
    serves."""
    settings = Settings(model=tiny_model_dirs["llama"], device="cpu", dtype="bfloat16")
    served = load_backbone(settings)  # packed where this CPU can: not trainable
    policy = replace(LENIENT, growth_check_sample=0)
    in_float32 = build_version(backbone, FACTS, encoder, None, policy)
    on_copy = build_version(served, FACTS, encoder, None, policy, training=backbone)
    trained_as_served = load_backbone(settings.model_copy(update={"train_dtype": "serving"}))
    in_bf16 = build_version(trained_as_served, FACTS, encoder, None, policy)

    def blocks(candidate: Candidate) -> torch.Tensor:
        return candidate.content.table[BLOCKS_KEY].float()

    assert torch.equal(blocks(on_copy), blocks(in_float32))
    assert not torch.equal(blocks(in_bf16), blocks(in_float32))
    checked: list[torch.dtype] = []
    handle = served.decoder_layers[0].register_forward_hook(
        lambda _m, inputs, _o: checked.append(inputs[0].dtype)
    )
    try:
        build_version(served, FACTS, encoder, None, policy, training=backbone)
    finally:
        handle.remove()
    assert checked and set(checked) == {torch.bfloat16}, "the check ran on the served model"


def test_held_out_probes_catch_a_pack_that_rewrites_its_subjects(backbone: Backbone) -> None:
    """Ungated deltas change every prompt about the subject: probe locality falls under the
    gate's minimum; no deltas leave every prediction as it was."""
    policy = BuildPolicy()
    huge = torch.randn(2, backbone.hidden_size, generator=torch.Generator().manual_seed(0)) * 300
    blunt = EditSet([SubjectEntry("danielle darrieux"), SubjectEntry("france")], huge, layer=1)
    assert probe_locality(backbone, FACTS, blunt, policy.probe_limit) < policy.min_locality
    nothing = EditSet(blunt.subjects, torch.zeros_like(huge), layer=1)
    assert probe_locality(backbone, FACTS, nothing, policy.probe_limit) == 1.0
