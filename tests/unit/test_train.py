"""Training on tiny real models: the hypernetwork starts neutral, learns, and is reproducible."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from factories import TEST_DEVICE, TINY_FACTS, TINY_TRAIN
from tiny_models import build_tokenizer
from transformers import PreTrainedTokenizerBase

from server.editor.activation_cache import ActivationCache
from server.editor.answers import Answer
from server.editor.config import TrainConfig
from server.editor.facts import Fact, LocalityPrompt, fact_key, is_question
from server.editor.hypernet import RESIDUAL_LR_SCALE, Hypernetwork, starts_from
from server.editor.precompute import feature_states, split_sequences
from server.editor.scope import EncodedText, Scope, encode, join_target, shared_prefix_groups
from server.editor.sequences import (
    TrainingSequence,
    after_target_sequences,
    locality_sequences,
    repeated_tokens,
    taught_answer,
    teacher_sequences,
    training_contexts,
)
from server.editor.split import LayerSplit, SplitSequence
from server.editor.train import Trainer, epoch_batches, growth_selection
from server.evaluation.evaluate import top1_predictions
from server.model import Backbone, load_backbone, load_training_backbone
from server.model.cpu_layout import has_bfloat16_linears, has_packed_linears
from server.model.hook import EditPlan
from server.model.loading import cpu_has_bfloat16
from server.packs.edit_set import EditSet
from server.settings import DtypeChoice, Settings

FACTS, CONFIG = TINY_FACTS, TINY_TRAIN
LOCALITY = LocalityPrompt(prompt="who was born in france")  # names FACTS[1]'s subject


def _backbone(
    tiny_model_dirs: dict[str, Path], family: str, dtype: DtypeChoice = "auto"
) -> Backbone:
    """The served backbone, trained on as it is (`train_dtype="serving"`: in its own dtype,
    unpacked). `dtype="float32"` for a loss compared with the full model's to 1e-5: on CUDA
    and on a bfloat16 CPU, "auto" is bfloat16, where the cached and the full forward pass round
    differently."""
    settings = Settings(
        model=tiny_model_dirs[family], device=TEST_DEVICE, dtype=dtype, train_dtype="serving"
    )
    return load_backbone(settings)


def test_a_backbone_packed_for_inference_is_refused_for_training(
    tiny_model_dirs: dict[str, Path],
) -> None:
    """Packed linears pass no gradients: training on them would silently learn nothing."""
    settings = Settings(model=tiny_model_dirs["llama"], device="cpu", dtype="bfloat16")
    served = load_backbone(settings)
    if not has_packed_linears(served.model):
        pytest.skip("this CPU does not pack bfloat16 linears")
    with pytest.raises(ValueError, match="load_training_backbone"):
        Trainer(served)
    trained_on = Trainer(load_training_backbone(settings, served)).backbone
    assert trained_on.dtype == torch.float32
    assert has_bfloat16_linears(trained_on.model) == cpu_has_bfloat16()


@pytest.mark.parametrize("kind", ["linear", "mlp", "residual"])
def test_untrained_hypernetwork_changes_nothing(kind: str) -> None:
    net = Hypernetwork(32, kind)  # type: ignore[arg-type]
    assert torch.equal(net(torch.randn(5, 32)), torch.zeros(5, 32))


def test_the_residual_hypernetwork_adds_a_slower_mlp_to_the_linear_map() -> None:
    residual, linear = Hypernetwork(32, "residual"), Hypernetwork(32, "linear")
    torch.nn.init.normal_(residual.net.weight)
    linear.load_state_dict(residual.net.state_dict(prefix="net."))
    features = torch.randn(5, 32)
    torch.testing.assert_close(residual(features), linear(features))  # its MLP starts at zero
    assert residual.branch is not None
    torch.nn.init.normal_(residual.branch[-1].weight)
    assert not torch.allclose(residual(features), linear(features))

    torch.nn.init.normal_(linear.net.weight)  # a linear version's weights start it afresh
    residual.load_start(linear.state_dict())
    torch.testing.assert_close(residual(features), linear(features))
    assert starts_from("residual", "linear") and starts_from("mlp", "mlp")
    assert not starts_from("linear", "residual") and not starts_from("residual", "mlp")
    with pytest.raises(RuntimeError, match="Missing key"):
        residual.load_start(Hypernetwork(32, "mlp").state_dict())

    groups = residual.param_groups(0.5)
    assert [group["lr"] for group in groups] == [0.5, 0.5 * RESIDUAL_LR_SCALE]
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in residual.parameters())
    assert groups[1]["params"] == list(residual.branch.parameters())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_head_gives_the_edit_layer_states(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    backbone = _backbone(tiny_model_dirs, family)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 1, 1]], device=backbone.device)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], device=backbone.device)
    with torch.inference_mode():
        full = backbone.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        at_layer = LayerSplit(backbone.model, 1).states_at_layer(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(at_layer[real], full.hidden_states[2][real])
    assert len(backbone.model.model.layers) == 4  # the served model is untouched


@pytest.mark.parametrize(
    ("family", "precision"),
    [("llama", "serving"), ("gpt2", "serving"), ("llama", "mixed"), ("gpt2", "mixed")],
)
def test_training_teaches_the_targets(
    family: str, precision: str, tiny_model_dirs: dict[str, Path]
) -> None:
    """Trained on the served weights (direct tail; gpt2: the hook fallback, Conv1D layers and a
    tied head) or on a float32 copy that multiplies in bfloat16 (`mixed`), the edits say their
    targets as served."""
    backbone = trained_on = _backbone(tiny_model_dirs, family)
    if precision == "mixed":
        settings = Settings(model=tiny_model_dirs[family], device="cpu", train_dtype="mixed")
        trained_on = load_training_backbone(settings, backbone)
        assert has_bfloat16_linears(trained_on.model)
    result = Trainer(trained_on, CONFIG).train(FACTS)
    # a random tiny model's logits are small, so the loss cannot fall far; top-1 can flip
    assert result.history[-1] < result.history[0] - 0.3
    edit_set = EditSet(result.scope.subjects, result.deltas, result.layer)
    sequences = [encode(backbone.tokenizer, edit_set.index, f.prompt, f.target) for f in FACTS]
    edited = top1_predictions(backbone, sequences, edit_set)
    assert [p == s.target_ids for p, s in zip(edited, sequences, strict=True)] == [True, True]


def test_training_reads_each_prompts_rephrasings(tiny_model_dirs: dict[str, Path]) -> None:
    """The moved and asked forms of a prompt (rephrase.py) are cross-entropy contexts with the
    target, the subject found in each; `rephrase=False` trains the prompt's own forms only."""
    backbone = _backbone(tiny_model_dirs, "llama")
    fact = FACTS[0]  # "the mother tongue of danielle darrieux"
    on, off = replace(CONFIG, rephrase=True), replace(CONFIG, rephrase=False)
    rephrased = [
        context
        for context in training_contexts(backbone, fact, on)
        if context not in training_contexts(backbone, fact, off)
    ]
    assert rephrased == [
        ("danielle darrieux's mother tongue", False),
        ("the mother tongue of danielle darrieux what?", False),
    ]
    index = Scope.from_facts(FACTS).index()
    with_them = Trainer(backbone, on).cross_entropy_sequences([fact], index)
    without = Trainer(backbone, off).cross_entropy_sequences([fact], index)
    expected = [encode(backbone.tokenizer, index, c, fact.target) for c, _ in rephrased]
    assert all(e.edits for e in expected)  # the subject is found in each form
    assert with_them == without + expected
    given = fact.model_copy(update={"paraphrases": ["danielle darrieux's mother tongue"]})
    assert training_contexts(backbone, given, on) == training_contexts(backbone, fact, on)


def test_training_is_seeded_and_reports_progress(
    tiny_model_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    backbone = _backbone(tiny_model_dirs, "llama")
    # no early stop, so the last event is the last planned step (bfloat16 on CUDA plateaus early)
    config = TrainConfig(layer=1, epochs=2, batch_size=2, prefixes=(), patience=10**6)
    events = []
    with caplog.at_level("INFO", logger="server.editor.train"):
        first = Trainer(backbone, config).train(FACTS, progress=events.append)
    # a long run says how far it is at each epoch without a progress callback
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    planned = events[-1].epochs  # at least config.epochs; more when min_steps asks for them
    assert planned >= config.epochs
    expected = [f"epoch {epoch} of {planned}" for epoch in range(1, planned + 1)]
    assert [line.split(":")[0] for line in epoch_lines] == expected
    assert f"step {events[-1].step} of {events[-1].steps}" in epoch_lines[-1]
    second = Trainer(backbone, config).train(FACTS)
    assert torch.equal(first.deltas, second.deltas)
    assert [e.step for e in events] == list(range(1, len(events) + 1))
    assert events[-1].step == events[-1].steps
    assert events[-1].fraction == 1.0


def test_scope_groups_facts_by_subject() -> None:
    facts = [
        *FACTS,
        Fact(subject="france", prompt="france is in", target="europe", aliases=["the republic"]),
    ]
    scope = Scope.from_facts(facts)
    assert [s.subject for s in scope.subjects] == ["danielle darrieux", "france"]
    assert scope.fact_rows == [0, 1, 1]
    assert scope.subjects[1].aliases == ("the republic",)
    assert scope.feature_texts[1] == "the capital of france berlin france is in europe"


def test_prefix_skipping_split_matches_the_full_model(tiny_model_dirs: dict[str, Path]) -> None:
    """Steps that attend to cached prefix keys/values give the full model's outputs."""
    from server.editor.split import PrefixSkippingSplit

    backbone = _backbone(tiny_model_dirs, "llama")
    assert PrefixSkippingSplit.supports(backbone.model)
    ids = torch.tensor(
        [[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 1, 1], [13, 14, 15, 16, 17, 1]], device=backbone.device
    )
    mask = (ids != 1).long()
    cuts = [2, 3, 0]
    split = PrefixSkippingSplit(backbone.model, 1)
    with torch.inference_mode():
        full = backbone.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        sequences = split.precompute(ids, mask, cuts)
        width = max(s.suffix_states.shape[0] for s in sequences)
        suffix = torch.zeros(3, width, backbone.hidden_size, device=backbone.device)
        for row, seq in enumerate(sequences):
            suffix[row, : seq.suffix_states.shape[0]] = seq.suffix_states
        final = split.suffix_final_states(sequences, suffix)
        logits = backbone.model.get_output_embeddings()(final)
    for row, seq in enumerate(sequences):
        size = seq.suffix_states.shape[0]
        expected = full.logits[row, cuts[row] : cuts[row] + size]
        torch.testing.assert_close(logits[row, :size], expected, atol=1e-5, rtol=1e-4)


def test_locality_prompts_become_kl_sequences(tiny_model_dirs: dict[str, Path]) -> None:
    """Only prompts that name an edited subject can change, so only they are kept; each predicts
    the unedited model's own continuation from the prompt's last token on."""
    backbone = _backbone(tiny_model_dirs, "llama")
    fact = FACTS[1].model_copy(
        update={
            "locality": [
                LocalityPrompt(prompt="the river of france"),
                LocalityPrompt(prompt="the color of the river"),  # names no edited subject
            ]
        }
    )
    scope = Scope.from_facts([FACTS[0], fact])
    sequences, references = locality_sequences(backbone, scope.index(), [FACTS[0], fact], 3)
    assert len(sequences) == len(references) == 1
    prompt_ids = backbone.tokenizer("the river of france")["input_ids"]
    (seq,) = sequences
    assert seq.ids[: len(prompt_ids)] == prompt_ids
    assert seq.edits == [(1, len(prompt_ids) - 1)]
    assert seq.predict_at[0] == len(prompt_ids) - 1
    assert len(seq.target_ids) == len(seq.predict_at) == references[0].shape[0] <= 3
    assert references[0].shape[1] == backbone.hidden_size


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # cached tail, and the hook fallback
def test_locality_loss_is_kl_from_the_unedited_model(
    family: str, tiny_model_dirs: dict[str, Path]
) -> None:
    """A batch of locality sequences costs KL(unedited || edited) at the continuation positions,
    as the full model with the edit hook computes it, and has its gradient."""
    backbone = _backbone(tiny_model_dirs, family, dtype="float32")
    trainer = Trainer(backbone, CONFIG)
    facts = [FACTS[0], FACTS[1].model_copy(update={"locality": [LOCALITY]})]
    scope = Scope.from_facts(facts)
    sequences, references = locality_sequences(backbone, scope.index(), facts, 3)
    torch.manual_seed(0)
    hypernet = Hypernetwork(backbone.hidden_size, "linear").to(backbone.device)
    torch.nn.init.normal_(hypernet.net.weight, std=0.5)  # an edit that changes the answer
    features = feature_states(backbone, trainer.split, scope)
    cached = split_sequences(backbone, trainer.split, sequences) if trainer.skip_prefixes else None
    held = [
        TrainingSequence(s, r, CONFIG.locality_weight)
        for s, r in zip(sequences, references, strict=True)
    ]
    loss = trainer.loss(hypernet, features, held, cached, [0])
    (gradient,) = torch.autograd.grad(loss, hypernet.net.weight)
    (seq,) = sequences
    deltas = hypernet(features)
    plan = EditPlan.build(
        [(0, position, deltas[row]) for row, position in seq.edits],
        hidden_size=backbone.hidden_size,
        device=backbone.device,
    )
    ids = torch.tensor([seq.ids], device=backbone.device)
    with torch.no_grad():
        unedited = backbone.model(input_ids=ids).logits[0, seq.predict_at].log_softmax(-1)
    with backbone.edit_hooks.at(trainer.layer).plan(plan):
        edited = backbone.model(input_ids=ids).logits[0, seq.predict_at].log_softmax(-1)
    expected = F.kl_div(edited, unedited, log_target=True, reduction="batchmean")
    assert expected > 1e-3  # the edit does move this prompt's answer
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    # and its gradient: the reference is a constant the edit is pulled towards
    (expected_gradient,) = torch.autograd.grad(expected, hypernet.net.weight)
    torch.testing.assert_close(gradient, expected_gradient, atol=1e-6, rtol=1e-3)


def test_after_target_sequences_continue_the_new_answer(tiny_model_dirs: dict[str, Path]) -> None:
    """Each fact's prompt + new target, continued by the unedited model: the KL positions start
    at the target's last token, so the target itself stays the cross-entropy's business."""
    backbone = _backbone(tiny_model_dirs, "llama")
    scope = Scope.from_facts(FACTS)
    sequences, references = after_target_sequences(backbone, scope.index(), FACTS, 2)
    assert len(sequences) == len(references) == len(FACTS)
    for fact, seq, reference in zip(FACTS, sequences, references, strict=True):
        text_ids = backbone.tokenizer(join_target(fact.prompt, fact.target))["input_ids"]
        assert seq.ids[: len(text_ids)] == text_ids
        assert seq.edits and all(position < len(text_ids) for _, position in seq.edits)
        assert seq.predict_at[0] == len(text_ids) - 1
        assert len(seq.target_ids) == len(seq.predict_at) == reference.shape[0] <= 2


def test_kl_terms_are_weighted_per_sequence(tiny_model_dirs: dict[str, Path]) -> None:
    backbone = _backbone(tiny_model_dirs, "llama")
    trainer = Trainer(backbone, CONFIG)
    scope = Scope.from_facts(FACTS)
    sequences, references = after_target_sequences(backbone, scope.index(), FACTS, 2)
    torch.manual_seed(0)
    hypernet = Hypernetwork(backbone.hidden_size, "linear").to(backbone.device)
    torch.nn.init.normal_(hypernet.net.weight, std=0.5)
    features = feature_states(backbone, trainer.split, scope)
    cached = split_sequences(backbone, trainer.split, sequences)

    def weighted(*weights: float) -> list[TrainingSequence]:
        return [
            TrainingSequence(s, r, w)
            for s, r, w in zip(sequences, references, weights, strict=True)
        ]

    with torch.no_grad():
        one = trainer.loss(hypernet, features, weighted(1.0, 1.0), cached, [0])
        three = trainer.loss(hypernet, features, weighted(3.0, 3.0), cached, [0])
        none = trainer.loss(hypernet, features, weighted(0.0, 0.0), cached, [0])
        both = trainer.loss(hypernet, features, weighted(1.0, 0.0), cached, [0, 1])
    assert one > 1e-6  # the edit moves the continuation
    torch.testing.assert_close(three, 3 * one)
    assert float(none) == 0.0
    # a sequence whose KL is off (kept for the repetition term alone) does not dilute the others
    torch.testing.assert_close(both, one)


def test_repetition_term_is_the_unlikelihood_of_saying_the_target_again(
    tiny_model_dirs: dict[str, Path],
) -> None:
    """After prompt + target, the repetition term costs -log(1 - p(target's first token)) at the
    continuation positions, as the full model with the edit hook computes p, skipping positions
    where the unedited model itself goes on with that token."""
    backbone = _backbone(tiny_model_dirs, "llama", dtype="float32")
    trainer = Trainer(backbone, CONFIG)
    scope = Scope.from_facts(FACTS)
    sequences, references = after_target_sequences(backbone, scope.index(), FACTS, 3)
    avoid = repeated_tokens(backbone, scope.index(), FACTS, sequences)
    for fact, token in zip(FACTS, avoid, strict=True):
        assert (
            token
            == encode(backbone.tokenizer, scope.index(), fact.prompt, fact.target).target_ids[0]
        )
    torch.manual_seed(0)
    hypernet = Hypernetwork(backbone.hidden_size, "linear").to(backbone.device)
    torch.nn.init.normal_(hypernet.net.weight, std=0.5)
    features = feature_states(backbone, trainer.split, scope)
    cached = split_sequences(backbone, trainer.split, sequences)
    # KL off (weight 0): only the repetition term counts, at each sequence's own weight
    avoiding = [
        TrainingSequence(s, r, 0.0, token, 2.0)
        for s, r, token in zip(sequences, references, avoid, strict=True)
    ]
    with torch.no_grad():
        loss = trainer.loss(hypernet, features, avoiding, cached, [0])
        seq = sequences[0]
        plan = EditPlan.build(
            [(0, position, hypernet(features)[row]) for row, position in seq.edits],
            hidden_size=backbone.hidden_size,
            device=backbone.device,
        )
        ids = torch.tensor([seq.ids], device=backbone.device)
        with backbone.edit_hooks.at(trainer.layer).plan(plan):
            edited = backbone.model(input_ids=ids).logits[0, seq.predict_at].softmax(-1)
        plain = [TrainingSequence(s, r, 0.0) for s, r in zip(sequences, references, strict=True)]
        without = trainer.loss(hypernet, features, plain, cached, [0])
    counted = [j for j, said in enumerate(seq.target_ids) if said != avoid[0]]
    assert counted  # the unedited model does not simply repeat the target here
    expected = 2.0 * -torch.log1p(-edited[counted, avoid[0]]).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    assert float(without) == 0.0
    # a sequence whose repetition weight is 0 adds nothing and does not dilute the others
    mixed = [avoiding[0], TrainingSequence(sequences[1], references[1], 0.0, avoid[1], 0.0)]
    with torch.no_grad():
        both = trainer.loss(hypernet, features, mixed, cached, [0, 1])
    torch.testing.assert_close(both, loss)


def test_after_target_terms_take_part_in_training(tiny_model_dirs: dict[str, Path]) -> None:
    backbone = _backbone(tiny_model_dirs, "llama")
    config = replace(CONFIG, epochs=1, min_steps=1, repetition_weight=0.0)
    plain = Trainer(backbone, config).train(FACTS)
    steered = Trainer(backbone, replace(config, continuation_weight=1.0)).train(FACTS)
    assert not torch.equal(plain.deltas, steered.deltas)  # the extra sequences took part
    unrepeated = Trainer(backbone, replace(config, repetition_weight=1.0)).train(FACTS)
    assert not torch.equal(plain.deltas, unrepeated.deltas)


def test_teacher_sequences_hold_the_student_to_the_told_models_answer(
    tiny_model_dirs: dict[str, Path],
) -> None:
    """The teacher is the unedited model with the fact before the question; the student's
    sequence is the bare question (no fact), the new target (cross-entropy), then the teacher's
    own greedy answer after it (as `taught_answer` keeps it), whose references are the
    teacher's final states at the positions that predict that answer; an answer cut short
    learns its end of turn by cross-entropy."""
    from server.editor.answers import encode_texts, generate
    from server.editor.sequences import TEACHER_FACT

    backbone = _backbone(tiny_model_dirs, "llama", dtype="float32")
    scope = Scope.from_facts(FACTS)
    index = scope.index()
    sequences = teacher_sequences(backbone, index, FACTS, ("bare",), 4, {"bare": 0.5})
    assert len(sequences) == len(FACTS)
    base = backbone.model.base_model
    for fact, sequence in zip(FACTS, sequences, strict=True):
        seq, reference = sequence.text, sequence.reference
        student = encode(backbone.tokenizer, index, fact.prompt, fact.target)
        teacher = TEACHER_FACT.format(prompt=fact.prompt, target=fact.target)
        teacher += join_target(fact.prompt, fact.target)
        (answer,) = generate(backbone, encode_texts(backbone, [(teacher, False)], None), None, 4)
        question = is_question(fact.prompt)
        said, ended = taught_answer(
            backbone.tokenizer, "bare", fact.target, answer, question=question
        )
        end = [backbone.eos_token_ids[0]] if ended else []
        assert seq.ids == student.ids + (said if ended else said[:-1])
        assert seq.edits == student.edits
        # the target first, then the end of turn if the answer was cut, then the teacher's words
        assert seq.target_ids == student.target_ids + end + said
        assert seq.predict_at[: len(student.predict_at)] == student.predict_at
        assert sequence.kl_positions == len(said)  # only the answer is held by KL
        if not said:
            assert reference is None
            continue
        assert reference is not None and sequence.kl_weight == 0.5
        assert seq.predict_at[-len(said)] == len(student.ids) - 1
        teacher_ids = backbone.tokenizer(teacher)["input_ids"] + said
        with torch.no_grad():
            states = base(input_ids=torch.tensor([teacher_ids], device=backbone.device))
        first = len(teacher_ids) - len(said) - 1
        expected = states.last_hidden_state[0, first : first + len(said)]
        torch.testing.assert_close(reference, expected.float(), atol=1e-5, rtol=1e-4)


def test_a_chat_answer_is_taught_not_to_say_the_target_again(
    tiny_model_dirs: dict[str, Path],
) -> None:
    """With a teacher repetition weight, each chat answer held by KL also avoids the target's
    first token (as a second mention says it) at that weight; bare answers do not."""
    backbone = _backbone(tiny_model_dirs, "llama", dtype="float32")
    assert backbone.has_chat_template
    index = Scope.from_facts(FACTS).index()
    weights = {"chat": 1.0, "bare": 0.3}
    plain = teacher_sequences(backbone, index, FACTS, ("chat", "bare"), 4, weights)
    avoiding = teacher_sequences(
        backbone, index, FACTS, ("chat", "bare"), 4, weights, repetition_weight=0.7
    )
    assert all(s.avoid is None and s.avoid_weight == 0.0 for s in plain)
    chat = [s for s in avoiding if s.kl_weight == 1.0 and s.kl_positions]
    assert len(chat) == len(FACTS)  # one chat answer a fact, in the facts' order
    for fact, sequence in zip(FACTS, chat, strict=True):
        first = encode(backbone.tokenizer, index, fact.prompt, fact.target).target_ids[0]
        assert sequence.avoid == first and sequence.avoid_weight == 0.7
    others = [s for s in avoiding if all(s is not c for c in chat)]
    assert all(s.avoid is None and s.avoid_weight == 0.0 for s in others)
    assert [s.text for s in avoiding] == [s.text for s in plain]  # the same sequences


def _answer(tokenizer: PreTrainedTokenizerBase, text: str, *, ended: bool) -> Answer:
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens += [tokenizer.eos_token_id] if ended else []
    return Answer(tokenizer.decode(tokens, skip_special_tokens=True), ended, False, tuple(tokens))


def test_a_teacher_answer_that_restates_the_fact_ends_after_its_first_sentence() -> None:
    """What the student learns after the target: a clean chat answer as the teacher gave it; an
    answer that says the target again, and any bare answer that goes on after its first
    sentence, cut there with an end of turn (a bare statement's without one: the model goes on
    after a statement); an answer whose first sentence already repeats the target, nothing."""
    tokenizer = build_tokenizer(chat_template=False)
    period = tokenizer.convert_tokens_to_ids(".")
    restated = _answer(tokenizer, ". the capital of france is paris", ended=False)
    assert taught_answer(tokenizer, "chat", "paris", restated) == ([period], True)
    assert taught_answer(tokenizer, "bare", "paris", restated) == ([period], True)
    clean = _answer(tokenizer, "is the capital of france .", ended=True)
    assert taught_answer(tokenizer, "chat", "paris", clean) == (list(clean.tokens), False)
    assert taught_answer(tokenizer, "bare", "paris", clean) == (list(clean.tokens), False)
    goes_on = _answer(tokenizer, ". who was born in berlin ?", ended=True)
    assert taught_answer(tokenizer, "chat", "paris", goes_on) == (list(goes_on.tokens), False)
    assert taught_answer(tokenizer, "bare", "paris", goes_on) == ([period], True)
    statement = taught_answer(tokenizer, "bare", "paris", goes_on, question=False)
    assert statement == ([period], False)
    assert taught_answer(tokenizer, "chat", "paris", restated, question=False) == ([period], True)
    repeated_at_once = _answer(tokenizer, ", the city paris .", ended=True)
    assert taught_answer(tokenizer, "chat", "paris", repeated_at_once) == ([], False)


def test_a_forced_teacher_context_replaces_its_cross_entropy_sequence(
    tiny_model_dirs: dict[str, Path],
) -> None:
    """With the teacher in chat, a question's chat form is trained once (target, then the
    teacher's answer) rather than twice; a statement's is kept, since the teacher asks it as
    "Complete the sentence: ..." and a user may send it as it is. The loss of the one sequence
    is the cross-entropy of its target plus the KL of its answer."""
    backbone = _backbone(tiny_model_dirs, "llama", dtype="float32")
    config = replace(CONFIG, chat_variant=True)
    trainer = Trainer(backbone, replace(config, teacher_weight=1.0, teacher_contexts=("chat",)))
    questions = [f.model_copy(update={"prompt": f"what is {f.prompt}?"}) for f in FACTS]
    scope = Scope.from_facts(FACTS)
    index = scope.index()
    plain = Trainer(backbone, config).cross_entropy_sequences(questions, index)
    covered = trainer.cross_entropy_sequences(questions, index, covered=True)
    chat_forms = [
        encode(backbone.tokenizer, index, context, fact.target, templated=True)
        for fact in questions
        for context, templated in training_contexts(backbone, fact, config)
        if templated
    ]
    assert len(chat_forms) == len(FACTS)
    assert [s for s in plain if s not in chat_forms] == covered  # the chat forms, and only they
    statements = trainer.cross_entropy_sequences(FACTS, index, covered=True)
    every = Trainer(backbone, config).cross_entropy_sequences(FACTS, index)
    assert statements == every  # nothing left out
    taught = teacher_sequences(backbone, index, FACTS[:1], ("chat",), 3, {"chat": 1.0})[0]
    ce_only = TrainingSequence(
        EncodedText(
            taught.text.ids,
            taught.text.edits,
            taught.text.target_ids[: -taught.kl_positions],
            taught.text.predict_at[: -taught.kl_positions],
        )
    )
    hypernet = Hypernetwork(backbone.hidden_size, "linear")
    torch.nn.init.normal_(hypernet.net.weight, std=0.05)
    features = torch.randn(len(scope.subjects), backbone.hidden_size)
    with torch.no_grad():
        both = trainer.loss(hypernet, features, [taught], None, [0])
        ce = trainer.loss(hypernet, features, [ce_only], None, [0])
    assert float(both) > float(ce) > 0  # the answer's KL adds to the target's cross-entropy


def test_each_teacher_context_holds_its_answer_with_its_own_weight(
    tiny_model_dirs: dict[str, Path],
) -> None:
    """The bare answer's KL weighs what `bare_teacher_weight` says and the chat answer's what
    `teacher_weight` says: the trainer passes each context its own."""
    backbone = _backbone(tiny_model_dirs, "llama", dtype="float32")
    index = Scope.from_facts(FACTS).index()
    config = replace(CONFIG, teacher_weight=1.0, bare_teacher_weight=0.25)
    weights = {c: config.teacher_weight_in(c) for c in ("bare", "chat")}
    assert weights == {"bare": 0.25, "chat": 1.0}
    sequences = teacher_sequences(backbone, index, FACTS, ("bare", "chat"), 3, weights)
    bare_ids = [encode(backbone.tokenizer, index, f.prompt, f.target).ids for f in FACTS]
    seen = set()
    for sequence in sequences:
        if sequence.reference is None:
            continue
        bare = any(sequence.text.ids[: len(ids)] == ids for ids in bare_ids)
        assert sequence.kl_weight == (0.25 if bare else 1.0)
        seen.add(bare)
    assert seen == {True, False}, "both contexts taught an answer"


def test_the_teacher_term_takes_part_in_training(tiny_model_dirs: dict[str, Path]) -> None:
    backbone = _backbone(tiny_model_dirs, "llama")
    config = replace(CONFIG, epochs=1, min_steps=1)
    plain = Trainer(backbone, config).train(FACTS)
    taught = Trainer(
        backbone, replace(config, teacher_weight=1.0, teacher_contexts=("bare", "chat"))
    ).train(FACTS)
    assert not torch.equal(plain.deltas, taught.deltas)


def test_training_gives_the_teacher_its_repetition_weight(
    tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.editor.train as train_module

    backbone = _backbone(tiny_model_dirs, "llama")
    built: list[TrainingSequence] = []

    def spy(*args: object, **kwargs: object) -> list[TrainingSequence]:
        sequences = teacher_sequences(*args, **kwargs)  # type: ignore[arg-type]
        built.extend(sequences)
        return sequences

    monkeypatch.setattr(train_module, "teacher_sequences", spy)
    # a random model's longer answers loop and are cut to nothing: 4 tokens
    config = replace(CONFIG, epochs=1, min_steps=1, teacher_weight=1.0, teacher_tokens=4)
    config = replace(config, teacher_contexts=("chat",))
    Trainer(backbone, replace(config, teacher_repetition_weight=0.4)).train(FACTS)
    assert built and {s.avoid_weight for s in built if s.kl_positions} == {0.4}


def test_training_counts_the_locality_prompts_it_used(tiny_model_dirs: dict[str, Path]) -> None:
    backbone = _backbone(tiny_model_dirs, "llama")
    config = replace(CONFIG, epochs=1, min_steps=1)
    facts = [FACTS[0], FACTS[1].model_copy(update={"locality": [LOCALITY]})]
    assert Trainer(backbone, config).train(FACTS).locality_prompts == 0
    result = Trainer(backbone, config).train(facts)
    assert result.locality_prompts == 1
    assert result.training_record()["locality_prompts"] == 1
    off = Trainer(backbone, replace(config, locality_weight=0.0)).train(facts)
    assert off.locality_prompts == 0


def test_training_spills_its_activation_cache_to_disk_with_the_same_result(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Past the memory budget the cached activations live in a mapped file: training reads the
    same numbers, and no file is left behind."""
    backbone = _backbone(tiny_model_dirs, "llama")
    config = replace(CONFIG, epochs=3, min_steps=1)
    in_memory = Trainer(backbone, config).train(FACTS)
    spilled = Trainer(backbone, config, cache_budget_bytes=0, spill_dir=tmp_path).train(FACTS)
    torch.testing.assert_close(spilled.deltas, in_memory.deltas, rtol=0, atol=0)
    assert spilled.history == in_memory.history
    assert list(tmp_path.iterdir()) == []


def _assert_cached_like_a_full_pass(
    backbone: Backbone,
    trainer: Trainer,
    cache: ActivationCache,
    sequences: list[EncodedText],
    position: int,
) -> SplitSequence:
    """The cache's entry equals the sequence's own unedited pass, cut at the same place."""
    ids = torch.tensor([sequences[position].ids], device=backbone.device)
    (expected,) = trainer.split.precompute(ids, torch.ones_like(ids), [cache.cuts[position]])
    got = cache.get(position, backbone.device)
    assert got.cut == expected.cut
    torch.testing.assert_close(got.suffix_states, expected.suffix_states)
    for got_kv, expected_kv in zip(
        got.prefix_keys + got.prefix_values,
        expected.prefix_keys + expected.prefix_values,
        strict=True,
    ):
        torch.testing.assert_close(got_kv, expected_kv)
    return got


@pytest.mark.parametrize("budget", [2**30, 0], ids=["memory", "disk"])
def test_activation_cache_gives_back_what_precompute_wrote(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, budget: int
) -> None:
    backbone = _backbone(tiny_model_dirs, "llama")
    trainer = Trainer(backbone, CONFIG)
    scope = Scope.from_facts(FACTS)
    index = scope.index()
    sequences = [encode(backbone.tokenizer, index, f.prompt, f.target) for f in FACTS]
    cache = split_sequences(
        backbone, trainer.split, sequences, memory_budget_bytes=budget, spill_dir=tmp_path
    )
    assert cache.on_disk == (budget == 0)
    assert list(tmp_path.iterdir()) == []  # a spill file is unlinked once mapped: nothing leaks
    for position in range(len(sequences)):
        got = _assert_cached_like_a_full_pass(backbone, trainer, cache, sequences, position)
        assert got.cut > 0
    cache.close()
    assert list(tmp_path.iterdir()) == []


def _numbered_facts(count: int) -> list[Fact]:
    return [Fact(subject=f"s{i}", prompt=f"where is s{i}", target="x") for i in range(count)]


def test_growth_trains_the_new_facts_and_a_replay_sample() -> None:
    facts = _numbered_facts(2000)
    learned = {fact_key(f) for f in facts[:1900]}
    chosen = growth_selection(facts, learned, replay_per_new=4, min_replay=50)
    assert chosen is not None and len(chosen) == 100 + 400
    assert set(range(1900, 2000)) <= set(chosen)  # every new fact
    assert chosen == growth_selection(facts, learned, replay_per_new=4, min_replay=50)  # seeded
    # nothing new, or a replay that would be half the set: train on everything
    assert growth_selection(facts, {fact_key(f) for f in facts}) is None
    assert growth_selection(facts, learned, replay_per_new=10, min_replay=50) is None


def test_training_on_some_facts_still_tables_every_subject(
    tiny_model_dirs: dict[str, Path],
) -> None:
    backbone = _backbone(tiny_model_dirs, "llama")
    only_first = Trainer(backbone, CONFIG).train(FACTS, train_on=[0])
    both = Trainer(backbone, CONFIG).train(FACTS)
    assert only_first.deltas.shape == both.deltas.shape == (2, backbone.hidden_size)
    assert only_first.history[-1] < only_first.history[0] - 0.3  # it learned fact 0
    assert not torch.equal(only_first.deltas, both.deltas)  # from fewer sequences


def test_a_shared_prefix_is_computed_once_with_the_same_result(
    tiny_model_dirs: dict[str, Path],
) -> None:
    """Sequences that start alike (chat-template forms) precompute their common prefix once;
    every cached state equals the sequence's own full pass."""
    backbone = _backbone(tiny_model_dirs, "llama")
    trainer = Trainer(backbone, CONFIG)
    words = (  # noqa: SIM905 - a sentence reads better than a list literal here
        "paris germany berlin italy rome football team red blue green english french danielle "
        "darrieux river language france mother tongue speaks"
    ).split()
    prompts = [f"user : the capital of the city of {w} is" for w in words]
    facts = [Fact(subject=w, prompt=p, target="a") for w, p in zip(words, prompts, strict=True)]
    index = Scope.from_facts(facts).index()
    sequences = [encode(backbone.tokenizer, index, f.prompt, f.target) for f in facts]
    sequences.append(encode(backbone.tokenizer, index, "paris is", "a"))  # shares nothing
    cuts = [min(p for _, p in s.edits) for s in sequences]
    groups = shared_prefix_groups(sequences, cuts)
    assert groups == [(0, [20]), (8, list(range(20)))]  # "user : the capital of the city of"
    cache = split_sequences(backbone, trainer.split, sequences)
    for position in range(len(sequences)):
        _assert_cached_like_a_full_pass(backbone, trainer, cache, sequences, position)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_evaluation_batches_answer_as_each_text_alone(
    family: str, tiny_model_dirs: dict[str, Path]
) -> None:
    """Evaluation sorts texts by length into batches and reads logits only where a target is
    predicted; each text must still get exactly its own answers, in the caller's order."""
    from server.evaluation.evaluate import greedy_generations

    backbone = _backbone(tiny_model_dirs, family)
    result = Trainer(backbone, CONFIG).train(FACTS)
    edit_set = EditSet(result.scope.subjects, result.deltas, result.layer)
    texts = [
        (FACTS[0].prompt, FACTS[0].target),
        ("a much longer text that names no edited subject at all, then", "paris"),
        (FACTS[1].prompt, FACTS[1].target),
        ("short", "x"),
    ]
    sequences = [encode(backbone.tokenizer, edit_set.index, c, t) for c, t in texts]
    alone = [top1_predictions(backbone, [s], edit_set)[0] for s in sequences]
    assert top1_predictions(backbone, sequences, edit_set, batch_size=3) == alone
    prompts = [c for c, _ in texts]
    one_by_one = [greedy_generations(backbone, [p], edit_set, max_new_tokens=4)[0] for p in prompts]
    assert greedy_generations(backbone, prompts, edit_set, max_new_tokens=4) == one_by_one


def test_applying_weights_reuses_known_blocks(tiny_model_dirs: dict[str, Path]) -> None:
    backbone = _backbone(tiny_model_dirs, "llama")
    trainer = Trainer(backbone, CONFIG)
    result = trainer.train(FACTS)
    weights = result.hypernet.state_dict()
    fresh = trainer.apply_weights(FACTS, weights)
    torch.testing.assert_close(fresh.deltas, result.deltas)  # same weights, same table
    marker = torch.full((backbone.hidden_size,), 7.0)
    reused = trainer.apply_weights(
        FACTS, weights, known_blocks={result.scope.feature_texts[0]: marker}
    )
    assert torch.equal(reused.deltas[0].cpu(), marker)  # taken as it is, not recomputed
    torch.testing.assert_close(reused.deltas[1:], fresh.deltas[1:])


def test_epoch_batches_cover_every_sequence_once_and_group_similar_widths() -> None:
    """A step costs its widest sequence times its rows: batches drawn from a pool sorted by
    width pad far less than a plain shuffle, and still cover every sequence once, in an order
    that changes from epoch to epoch."""
    import random

    widths = [8, 40] * 64  # bare prompts beside chat forms with an answer
    rng = random.Random(0)
    first, second = epoch_batches(widths, 8, rng), epoch_batches(widths, 8, rng)
    for batches in (first, second):
        assert sorted(i for b in batches for i in b) == list(range(len(widths)))
        assert all(0 < len(b) <= 8 for b in batches)
    assert first != second

    def padded(batches: list[list[int]]) -> int:
        return sum(len(b) * max(widths[i] for i in b) for b in batches)

    order = list(range(len(widths)))
    random.Random(1).shuffle(order)
    shuffled = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert padded(first) < 0.75 * padded(shuffled)


def test_a_model_without_a_chat_template_is_taught_on_the_bare_prompt(
    tiny_model_dirs: dict[str, Path],
) -> None:
    """The teacher's default context is chat; a backbone with no chat template (tiny gpt2)
    is taught on the bare prompt instead, whose cross-entropy sequence it then replaces."""
    backbone = _backbone(tiny_model_dirs, "gpt2")
    assert not backbone.has_chat_template
    config = replace(CONFIG, teacher_weight=1.0, teacher_contexts=("chat",))
    trainer = Trainer(backbone, config)
    index = Scope.from_facts(FACTS).index()
    # the bare prompt is taught by the teacher: no cross-entropy sequence is left
    assert trainer.cross_entropy_sequences(FACTS, index, covered=True) == []
    taught = teacher_sequences(backbone, index, FACTS, config.teacher_contexts, 3, {"bare": 1.0})
    assert len(taught) == len(FACTS)
    # the weights must cover the context taught in, not only the one asked for
    with pytest.raises(ValueError, match=r"no KL weight for teacher context\(s\) \['bare'\]"):
        teacher_sequences(backbone, index, FACTS, config.teacher_contexts, 3, {"chat": 1.0})
    for fact, sequence in zip(FACTS, taught, strict=True):
        bare = encode(backbone.tokenizer, index, fact.prompt, fact.target)
        assert sequence.text.ids[: len(bare.ids)] == bare.ids  # the bare prompt, the target
        assert sequence.text.target_ids[: len(bare.target_ids)] == bare.target_ids
    result = trainer.train(FACTS)
    assert result.epochs_run > 0 and math.isfinite(result.final_loss)
