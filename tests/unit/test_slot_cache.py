"""The slot KV cache decodes exactly as the re-batched `DynamicCache` did, on every tiny family,
with edited and unedited rows mixed and rows joining and leaving mid-decode; a join or a leave
never moves another row's keys and values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import TEST_DEVICE
from tiny_models import FAMILIES
from transformers import DynamicCache

from server.engine.engine import BatchEngine, EngineEvent, EngineRequest, Finished, Generation
from server.engine.prepare import PreparedPrompt
from server.engine.sampling import SamplingParams
from server.engine.slot_cache import SlotKV, bucket
from server.model import Backbone, load_backbone
from server.model.cpu_layout import can_pack_linears, has_packed_linears
from server.packs.edit_set import PlannedEdit
from server.settings import Settings


@pytest.fixture(scope="module", params=FAMILIES)
def backbone(request: pytest.FixtureRequest, tiny_model_dirs: dict[str, Path]) -> Backbone:
    return load_backbone(Settings(model=tiny_model_dirs[request.param], device=TEST_DEVICE))


def prepared(backbone: Backbone, index: int) -> tuple[PreparedPrompt, SamplingParams]:
    """Prompt `index` of a fixed mix: lengths 3 to 30 tokens, every other one edited at a
    position inside it, greedy, some ignoring eos so they outlive their companions."""
    generator = torch.Generator().manual_seed(index)
    vocab = int(backbone.model.config.vocab_size)
    length = 3 + (index * 7) % 28
    token_ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
    edits = []
    if index % 2:
        delta = torch.randn(backbone.hidden_size, generator=generator) * 300
        edits.append(PlannedEdit(1, length - 1, delta, f"t@1:s{index}"))
    params = SamplingParams(max_tokens=3 + (index * 5) % 11, ignore_eos=index % 3 == 0)
    return PreparedPrompt(token_ids, edits), params


def run_joining_and_leaving(
    engine: BatchEngine, backbone: Backbone, count: int
) -> list[Generation]:
    """Requests added one per step while earlier ones decode and finish."""
    results: dict[int, Generation] = {}

    def collect(event: EngineEvent, index: int) -> None:
        if isinstance(event, Finished):
            results[index] = event.generation

    pending = []
    for index in range(count):
        prompt, params = prepared(backbone, index)
        request = EngineRequest("", params, prompt=prompt)
        request.sink = lambda event, index=index: collect(event, index)
        pending.append(request)
    engine.add(pending.pop(0))
    while engine.has_work() or pending:
        engine.step()
        if pending:
            engine.add(pending.pop(0))
    return [results[i] for i in range(count)]


def test_the_slot_cache_decodes_token_for_token_as_the_dynamic_cache(backbone: Backbone) -> None:
    slot_engine = BatchEngine(backbone, max_batch_size=3, prefill_chunk_tokens=8)
    assert slot_engine.slot_decoder is not None, "the slot path serves every tiny family"
    dynamic_engine = BatchEngine(
        backbone, max_batch_size=3, prefill_chunk_tokens=8, slot_cache=False
    )
    slots = run_joining_and_leaving(slot_engine, backbone, 12)
    dynamic = run_joining_and_leaving(dynamic_engine, backbone, 12)
    assert slots == dynamic
    assert any(g.edits_applied for g in slots) and any(not g.edits_applied for g in slots)
    lengths = {g.tokens for g in slots}
    assert len(lengths) > 3, "rows of different lengths leave at different steps"
    edited, _ = prepared(backbone, 1)
    plain = PreparedPrompt(edited.token_ids, [])
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    with_edit, without = BatchEngine(backbone).generate(
        [EngineRequest("", params, prompt=edited), EngineRequest("", params, prompt=plain)]
    )
    assert with_edit.token_ids != without.token_ids, "the edit reaches the decoded tokens"


def test_joins_and_leaves_move_no_other_row(backbone: Backbone) -> None:
    engine = BatchEngine(backbone, max_batch_size=4)
    long_prompt, _ = prepared(backbone, 5)
    first = EngineRequest("", SamplingParams(max_tokens=30, ignore_eos=True), prompt=long_prompt)
    engine.add(first)
    engine.step()
    decoder, batch = engine.slot_decoder, engine._batch
    assert decoder is not None and decoder.kv is not None and batch is not None
    slot = batch.slots[0]
    addresses = [t.data_ptr() for t in decoder.kv.keys + decoder.kv.values]
    written = batch.lengths[0]
    before = [k[slot, :, :written].clone() for k in decoder.kv.keys]
    for index in (2, 3, 4):  # three join, then leave while the first row runs on
        prompt, _ = prepared(backbone, index)
        engine.add(EngineRequest("", SamplingParams(max_tokens=2), prompt=prompt))
    for _ in range(4):
        engine.step()
    assert engine.running == 1 and engine._batch is not None
    assert engine._batch.slots == [slot]
    assert [t.data_ptr() for t in decoder.kv.keys + decoder.kv.values] == addresses
    for keys, old in zip(decoder.kv.keys, before, strict=True):
        assert torch.equal(keys[slot, :, :written], old)


def test_growing_the_slots_keeps_the_written_columns(backbone: Backbone) -> None:
    ids = torch.randint(3, 30, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=backbone.model.config)
    with torch.inference_mode():
        backbone.model(input_ids=ids.to(backbone.device), cache=cache, use_cache=True)
        kv = SlotKV(cache, slots=3, columns=16)
        kv.write_prompt(2, cache, row=1, length=9)
        kv.reserve(40, occupied={2: 9})
    assert kv.columns == 64 == bucket(40, 1 << 20, minimum=64)
    for mine, layer in zip(kv.keys, cache.layers, strict=True):
        assert torch.equal(mine[2, :, :9], layer.keys[1])


def long_prepared(backbone: Backbone, index: int) -> tuple[PreparedPrompt, SamplingParams]:
    """As `prepared`, some long enough that the rows read past 64 columns (the next bucket)."""
    prompt, params = prepared(backbone, index)
    if index % 4 == 1:
        prompt = PreparedPrompt((prompt.token_ids * 50)[:50], prompt.edits)
        params = SamplingParams(max_tokens=20, ignore_eos=True)
    return prompt, params


def test_a_compiled_step_is_one_graph_and_stops_compiling_once_warm(
    tiny_model_dirs: dict[str, Path],
) -> None:
    """`fullgraph=True` (the default): the edit hook and the slot cache trace without a break;
    the compiled engine gives the eager engine's tokens, and once `warm_up` has run one row and
    two rows, rows joining and leaving at other batch sizes and widths compile nothing more."""
    from torch._dynamo.utils import counters

    backbone = load_backbone(
        Settings(model=tiny_model_dirs["llama"], device=TEST_DEVICE, dtype="float32")
    )

    def workload(engine: BatchEngine, first: int, count: int) -> list[Generation]:
        results = []
        for index in range(first, first + count):  # one row alone first, then joins and leaves
            prompt, params = long_prepared(backbone, index)
            results.append(EngineRequest("", params, prompt=prompt))
        return engine.generate(results[:1]) + engine.generate(results[1:])

    steps: list[int] = []  # what the metrics see
    compiled = BatchEngine(backbone, max_batch_size=8, compile_decode=True, on_step=steps.append)
    on_cpu = TEST_DEVICE == "cpu"
    decoder = compiled.slot_decoder
    assert decoder is not None and decoder.compiled_rows == (1 if on_cpu else 8)
    decoder.compiled_rows = 8  # every bucket compiled (a CPU compiles one row only)
    eager = BatchEngine(backbone, max_batch_size=8)
    assert eager.warm_up() == 0.0 and not eager.compiles_decode, "nothing to compile"
    assert compiled.warm_up() > 0.0
    assert steps == [], "the throwaway requests are not served traffic"
    assert decoder.compiled, "no fallback to eager"
    assert decoder.compiled_shapes == {(1, 64), (2, 64)}, "one row, then several"
    warm = counters["stats"]["unique_graphs"]  # earlier tests' graphs may serve these shapes
    assert workload(compiled, 0, 4) == workload(eager, 0, 4)
    assert workload(compiled, 10, 9) == workload(eager, 10, 9)
    assert decoder.compiled and steps
    assert counters["stats"]["unique_graphs"] == warm, "a join, a leave or a width recompiled"
    assert {rows for rows, _ in decoder.compiled_shapes} >= {1, 2, 8}
    assert {width for _, width in decoder.compiled_shapes} == {64, 128}


def test_on_a_cpu_one_row_runs_compiled_and_several_run_eager(
    tiny_model_dirs: dict[str, Path],
) -> None:
    """The CPU policy: warm-up compiles the one-row graph only; steps of several rows run eager
    (no new graph) and every step gives the eager engine's tokens."""
    backbone = load_backbone(
        Settings(model=tiny_model_dirs["llama"], device="cpu", dtype="float32")
    )
    compiled = BatchEngine(backbone, max_batch_size=4, compile_decode=True)
    eager = BatchEngine(backbone, max_batch_size=4)
    assert compiled.warm_up() > 0.0
    decoder = compiled.slot_decoder
    assert decoder is not None and decoder.compiled_shapes == {(1, 64)}
    requests = [prepared(backbone, index) for index in range(5)]

    def run(engine: BatchEngine) -> list[Generation]:
        alone = engine.generate([EngineRequest("", requests[0][1], prompt=requests[0][0])])
        together = [EngineRequest("", params, prompt=prompt) for prompt, params in requests[1:]]
        return alone + engine.generate(together)

    assert run(compiled) == run(eager)
    assert decoder.compiled, "no fallback to eager"
    assert {rows for rows, _ in decoder.compiled_shapes} == {1}, "several rows ran compiled"


@pytest.mark.skipif(not can_pack_linears(torch.bfloat16), reason="no oneDNN bfloat16 matmul")
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_bfloat16_linears_decode_as_the_unpacked_ones(
    family: str, tiny_model_dirs: dict[str, Path]
) -> None:
    """Served in bfloat16 on a CPU that packs its linears (training runs on a float32 copy),
    the engine gives the tokens of the same model unpacked, edited and unedited rows joining
    and leaving; asked to compile its step, it runs eager (a packed weight cannot be traced)."""
    settings = Settings(model=tiny_model_dirs[family], device="cpu", dtype="bfloat16")
    packed = load_backbone(settings)
    plain = load_backbone(settings.model_copy(update={"train_dtype": "serving"}))
    assert has_packed_linears(packed.model) and not has_packed_linears(plain.model)
    engine = BatchEngine(packed, max_batch_size=3, compile_decode=True)
    assert engine.warm_up() == 0.0 and not engine.compiles_decode
    expected = run_joining_and_leaving(BatchEngine(plain, max_batch_size=3), plain, 7)
    assert run_joining_and_leaving(engine, packed, 7) == expected


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eager_attention_reads_the_slots_through_an_additive_mask(
    family: str, tiny_model_dirs: dict[str, Path]
) -> None:
    """Eager attention adds its mask: the slot path builds that form for it, and falls back to
    the re-batched `DynamicCache` for an attention it cannot mask."""
    backbone = load_backbone(Settings(model=tiny_model_dirs[family], device=TEST_DEVICE))
    backbone.model.set_attn_implementation("eager")
    slot_engine = BatchEngine(backbone, max_batch_size=3)
    assert slot_engine.slot_decoder is not None and not slot_engine.slot_decoder.bool_mask
    dynamic_engine = BatchEngine(backbone, max_batch_size=3, slot_cache=False)
    slots = run_joining_and_leaving(slot_engine, backbone, 7)
    assert slots == run_joining_and_leaving(dynamic_engine, backbone, 7)
    backbone.model.config._attn_implementation = "flash_attention_2"
    assert BatchEngine(backbone).slot_decoder is None


def test_a_compiled_step_decodes_the_model_it_was_built_for(tmp_path: Path) -> None:
    """Two models of one shape share the compiled graphs' code; the frozen weights must still
    be each engine's own: compiled greedy tokens equal each model's eager ones."""
    from tiny_models import build_tiny_model

    def tokens(backbone: Backbone, compile: bool) -> list[list[int]]:
        engine = BatchEngine(backbone, max_batch_size=4, compile_decode=compile)
        engine.warm_up()
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        answers = []
        for i in range(3):  # one at a time: a lone row runs compiled on any device
            request = EngineRequest("", params, prompt=PreparedPrompt([5 + i, 6, 7, 8], []))
            answers += [g.token_ids for g in engine.generate([request])]
        return answers

    models = [
        load_backbone(
            Settings(
                model=build_tiny_model("llama", tmp_path / str(seed), seed=seed),
                device=TEST_DEVICE,
                dtype="float32",
            )
        )
        for seed in (3, 4)
    ]
    eager = [tokens(m, compile=False) for m in models]
    assert eager[0] != eager[1], "the two models must answer differently to tell them apart"
    assert [tokens(m, compile=True) for m in models] == eager
