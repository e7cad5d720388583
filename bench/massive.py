"""Massive editing benchmark: 10,000-fact packs (the massive-editing issue).

Subcommands, each printing one JSON object (and writing it under --out when given):

    train    train the hypernetwork on 8,000 zsRE dev + 2,000 CounterFact dev facts; with
             --max-steps, stop early and extrapolate the full time from the steps run
    compare  our trainer vs the reference training loop (bench/reference_loop.py) on the same
             facts: time to the same reliability
    grow     add 100 facts to the trained 10,000-fact hypernetwork (warm start + replay) and
             check the earlier facts before and after
    grow-published
             the worker's growth: the pack serve published, grown by 100 facts with the same
             weights, reusing its blocks and gate embeddings (only new subjects cost a pass)
    detect   subject detection over the 10,000 subjects plus one alias each: per-prompt cost
    serve    a real `lks serve` with the 10,000-subject pack vs no pack at concurrency 1, and
             the pack's load time and memory

    make bench-massive   (all of them, JSON under bench/massive/, table in bench/massive.md)
    PYTHONPATH=bench .venv/bin/python bench/massive.py train --out bench/massive
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import psutil
import torch
from safetensors.torch import load_file, save_file

from server.editor.config import HypernetKind, TrainConfig
from server.editor.facts import Fact, fact_key
from server.editor.precompute import feature_states
from server.editor.scope import Scope, encode
from server.editor.split import LayerSplit
from server.editor.train import Trainer
from server.evaluation.datasets import dataset_path, load_items
from server.evaluation.evaluate import EvalItem, top1_predictions
from server.model import Backbone, load_backbone
from server.packs.edit_set import EditSet
from server.settings import Settings

log = logging.getLogger("bench.massive")


class StopTraining(Exception):
    pass


def dev_items(settings: Settings, zsre: int, counterfact: int) -> list[EvalItem]:
    items = load_items(dataset_path(settings.data_dir, "zsre"), "dev", zsre) if zsre else []
    if counterfact:
        items += load_items(dataset_path(settings.data_dir, "counterfact"), "dev", counterfact)
    return items


def peak_rss_gib() -> float:
    """Peak resident set, mapped file pages (the spilled activation cache) included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def anonymous_rss_gib() -> float:
    """Resident memory the process owns (not file pages the OS can drop), Linux only."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return float("nan")
    for line in status.read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def reliability(
    backbone: Backbone, scope: Scope, layer: int, deltas: torch.Tensor, facts: Sequence[Fact]
) -> float:
    """Teacher-forced top-1 on the facts' own prompts, gate left out (it always opens on an
    edit's own prompt)."""
    return teacher_forced(backbone, scope, layer, deltas, [(f.prompt, f.target) for f in facts])


def cmd_train(args: argparse.Namespace, settings: Settings, backbone: Backbone) -> dict[str, Any]:
    facts = [it.fact for it in dev_items(settings, args.zsre, args.counterfact)]
    config = TrainConfig(repetition_weight=args.repetition_weight, hypernet=args.hypernet_kind)
    trainer = Trainer(backbone, config, cache_budget_bytes=int(args.cache_gib * 2**30))
    steps: list[tuple[int, int, float]] = []  # (step, total steps, elapsed s)

    peak_anonymous = [anonymous_rss_gib()]

    def progress(event: Any) -> None:
        steps.append((event.step, event.steps, event.elapsed_s))
        if event.step % 200 == 1:
            peak_anonymous.append(anonymous_rss_gib())
        if (args.max_steps and event.step >= args.max_steps) or (
            args.max_seconds and event.elapsed_s >= args.max_seconds and len(steps) > 1
        ):
            raise StopTraining

    started = time.perf_counter()
    record: dict[str, Any] = {
        "facts": len(facts),
        "device": str(backbone.device),
        "repetition_weight": config.repetition_weight,
        "hypernet": config.hypernet,
    }
    try:
        result = trainer.train(facts, progress)
    except StopTraining:
        (first, total, first_elapsed), (last, _, last_elapsed) = steps[0], steps[-1]
        per_step = (last_elapsed - first_elapsed) / (last - first)
        precompute = first_elapsed - per_step
        record.update(
            complete=False,
            steps_run=last,
            steps_planned=total,
            precompute_seconds=round(precompute, 1),
            seconds_per_step=round(per_step, 4),
            estimated_train_seconds=round(precompute + per_step * total, 1),
            peak_rss_gib=round(peak_rss_gib(), 2),
            peak_anonymous_rss_gib=round(max(peak_anonymous), 2),
        )
        return record
    wall = time.perf_counter() - started
    sample = facts[:: max(1, len(facts) // args.check)]
    record.update(
        complete=True,
        subjects=len(result.scope.subjects),
        train_seconds=round(result.seconds, 1),
        wall_seconds=round(wall, 1),
        epochs_run=result.epochs_run,
        steps=steps[-1][0],
        final_loss=round(result.final_loss, 4),
        history=[round(h, 4) for h in result.history],
        reliability_sample=len(sample),
        reliability=round(
            reliability(backbone, result.scope, result.layer, result.deltas, sample), 4
        ),
        peak_rss_gib=round(peak_rss_gib(), 2),
        peak_anonymous_rss_gib=round(max(peak_anonymous), 2),
    )
    if backbone.device.type == "cuda":
        record["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    weights_path = args.weights or default_weights(settings)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.float().cpu().contiguous() for k, v in result.hypernet.state_dict().items()}
    save_file(weights, str(weights_path))
    record["weights"] = str(weights_path)
    return record


def default_weights(settings: Settings) -> Path:
    """Where `train` keeps the trained 10,000-fact hypernetwork for `serve` and `grow`."""
    return settings.cache_dir / "bench-massive" / "hypernet.safetensors"


def cmd_compare(args: argparse.Namespace, settings: Settings, backbone: Backbone) -> dict[str, Any]:
    from reference_loop import ReferenceLoopTrainer

    facts = [it.fact for it in dev_items(settings, args.n, 0)]
    # the reference loop has no repetition term: both loops train the same loss
    config = TrainConfig(repetition_weight=0.0)
    ours = Trainer(backbone, config).train(facts)
    ours_rel = reliability(backbone, ours.scope, ours.layer, ours.deltas, facts)
    log.info("ours: %.1f s, reliability %.4f", ours.seconds, ours_rel)
    goal = ours_rel - args.tolerance
    reference = ReferenceLoopTrainer(backbone, config)
    scope = Scope.from_facts(facts)
    features = feature_states(backbone, LayerSplit(backbone.model, reference.layer), scope)
    curve: list[dict[str, float]] = []

    def on_epoch(epoch: int, net: Any, seconds: float) -> bool:
        with torch.no_grad():
            rel = reliability(backbone, scope, reference.layer, net(features), facts)
        curve.append({"epoch": epoch, "train_seconds": round(seconds, 1), "reliability": rel})
        log.info("reference epoch %d: %.1f s, reliability %.4f", epoch, seconds, rel)
        # past stop_ratio x our time without our reliability, the speedup's lower bound is
        # proven: spending more would only tighten it
        return (
            rel >= goal
            or seconds > args.max_reference_seconds
            or seconds > args.stop_ratio * ours.seconds
        )

    run, _, _ = reference.train(facts, on_epoch, max_epochs=args.max_reference_epochs)
    reached = curve[-1]["reliability"] >= goal
    return {
        "facts": len(facts),
        "device": str(backbone.device),
        "ours_train_seconds": round(ours.seconds, 1),
        "ours_epochs": ours.epochs_run,
        "ours_reliability": round(ours_rel, 4),
        "reference_reached": reached,
        "reference_train_seconds": round(run.train_seconds, 1),
        "reference_epochs": run.epochs_run,
        "reference_curve": curve,
        "speedup": round(run.train_seconds / ours.seconds, 2),
        "speedup_is_lower_bound": not reached,
    }


def teacher_forced(
    backbone: Backbone, scope: Scope, layer: int, deltas: torch.Tensor, pairs: Sequence[tuple]
) -> float:
    """Mean top-1 accuracy on (context, target) pairs with the table applied, gate left out."""
    table = EditSet(subjects=scope.subjects, deltas=deltas.to(backbone.dtype), layer=layer)
    sequences = [encode(backbone.tokenizer, table.index, c, t) for c, t in pairs]
    predicted = top1_predictions(backbone, sequences, table)
    scores = [
        sum(p == t for p, t in zip(pred, seq.target_ids, strict=True)) / len(seq.target_ids)
        for pred, seq in zip(predicted, sequences, strict=True)
    ]
    return round(sum(scores) / len(scores), 4)


def growth_inputs(
    args: argparse.Namespace, settings: Settings
) -> tuple[list[EvalItem], list[EvalItem], dict[str, torch.Tensor]]:
    """(the pack's items, the --new CounterFact dev items after them, the trained weights)."""
    old_items = dev_items(settings, args.zsre, args.counterfact)
    path = dataset_path(settings.data_dir, "counterfact")
    new_items = load_items(path, "dev", args.new, offset=args.counterfact)
    return old_items, new_items, load_file(str(args.hypernet or default_weights(settings)))


def cmd_grow(args: argparse.Namespace, settings: Settings, backbone: Backbone) -> dict[str, Any]:
    """Add facts to a trained pack by warm start on the new facts plus a replay sample, and
    check the earlier facts before and after."""
    from server.editor.train import growth_selection

    old_items, new_items, weights = growth_inputs(args, settings)
    facts = [it.fact for it in old_items + new_items]
    learned = {fact_key(f) for f in facts[: len(old_items)]}
    config = TrainConfig(repetition_weight=args.repetition_weight, hypernet=args.hypernet_kind)
    trainer = Trainer(backbone, config)
    applied = trainer.apply_weights(facts, weights)  # the worker's first try: no training
    scope, layer, before = applied.scope, applied.layer, applied.deltas
    sample = old_items[:: max(1, len(old_items) // args.check)]
    reliability_pairs = [(it.fact.prompt, it.fact.target) for it in sample]
    generality_pairs = [(it.generality, it.fact.target) for it in sample if it.generality]
    new_pairs = [(it.fact.prompt, it.fact.target) for it in new_items]
    train_on = growth_selection(facts, learned)
    assert train_on is not None, "the growth is too large for a replay: retrain instead"
    result = trainer.train(facts, warm_start=weights, train_on=train_on)
    record = {
        "facts_before": len(old_items),
        "facts_added": len(new_items),
        "facts_trained": len(train_on),
        "grow_train_seconds": round(result.seconds, 1),
        "feature_pass_seconds": round(applied.seconds, 1),
        "epochs_run": result.epochs_run,
        "old_sample": len(sample),
        "repetition_weight": args.repetition_weight,
        "hypernet": args.hypernet_kind,
    }
    for label, deltas in (("before", before), ("after", result.deltas)):
        record[f"old_reliability_{label}"] = teacher_forced(
            backbone, scope, layer, deltas, reliability_pairs
        )
        record[f"old_generality_{label}"] = teacher_forced(
            backbone, scope, layer, deltas, generality_pairs
        )
        record[f"new_reliability_{label}"] = teacher_forced(
            backbone, scope, layer, deltas, new_pairs
        )
    if args.full_train_json:
        full = json.loads(args.full_train_json.read_text())
        record["full_train_seconds"] = full["train_seconds"]
        record["fraction_of_full"] = round(result.seconds / full["train_seconds"], 3)
    return record


def cmd_grow_published(
    args: argparse.Namespace, settings: Settings, backbone: Backbone
) -> dict[str, Any]:
    """The worker's growth at 10,000 facts: the published pack's weights applied to the grown
    fact set, reusing the blocks and gate embeddings the published version computed (only the
    new subjects cost a forward pass). Needs the pack `serve --packs-dir` published."""
    from server.builder.edits import KnownParts
    from server.builder.version import BuildPolicy, StartingPoint, build_version
    from server.gate.encoder import SentenceEncoder
    from server.packs import PackStore
    from server.packs.names import PackRef

    store = PackStore(args.packs_dir)
    assert store.versions("massive"), f"no massive pack in {args.packs_dir}: run serve first"
    pack = store.load(store.resolve(PackRef("massive")))
    known = KnownParts.from_content(pack.content)
    old_items, new_items, weights = growth_inputs(args, settings)
    facts = [it.fact for it in old_items + new_items]
    learned = frozenset(fact_key(f) for f in facts[: len(old_items)])
    start = StartingPoint(weights, learned, known, source="massive")
    started = time.perf_counter()
    # the worker's first try, unchecked here: the previous weights as they are
    candidate = build_version(
        backbone, facts, SentenceEncoder(), start, BuildPolicy(quality_gate=False)
    )
    result = candidate.edits.result
    seconds = time.perf_counter() - started
    old_texts = [t for t in result.scope.feature_texts if t in known.blocks]
    row_of = {t: row for row, t in enumerate(result.scope.feature_texts)}
    difference = max(
        float((result.deltas[row_of[t]] - known.blocks[t].to(result.deltas)).abs().max())
        for t in old_texts
    )
    new_pairs = [(it.fact.prompt, it.fact.target) for it in new_items]
    record: dict[str, Any] = {
        "facts_before": len(old_items),
        "facts_added": len(new_items),
        "subjects_reused": len(old_texts),
        "subjects_computed": len(result.scope.feature_texts) - len(old_texts),
        "grow_seconds": round(seconds, 1),
        "earlier_blocks_max_difference": difference,
        "new_reliability": teacher_forced(
            backbone, result.scope, result.layer, result.deltas, new_pairs
        ),
    }
    if args.full_train_json:
        full = json.loads(args.full_train_json.read_text())
        record["full_train_seconds"] = full["train_seconds"]
        record["fraction_of_full"] = round(seconds / full["train_seconds"], 4)
    return record


def cmd_detect(args: argparse.Namespace, settings: Settings, backbone: Backbone | None) -> dict:
    from serve import percentile

    from server.editor.detect import SubjectIndex

    items = dev_items(settings, 8000, 2000)
    subjects = list(dict.fromkeys(it.fact.subject for it in items))
    # one alias per subject: its upper-cased name (the automaton's cost depends on the keys'
    # count and the prompt's length, not on what an alias says)
    names = [(s, row) for row, s in enumerate(subjects)]
    names += [(s.upper(), row) for row, s in enumerate(subjects)]
    started = time.perf_counter()
    index = SubjectIndex(names)
    build_s = time.perf_counter() - started
    test = load_items(dataset_path(settings.data_dir, "zsre"), "test", 2000)
    test += load_items(dataset_path(settings.data_dir, "counterfact"), "test", 2000)
    prompts = [it.fact.prompt for it in items[::5]]  # name an edited subject
    prompts += [p for it in test for p in (it.fact.prompt, it.generality, it.locality_prompt) if p]
    for prompt in prompts[:200]:  # warm-up
        index.find(prompt)
    costs, found = [], 0
    for _ in range(args.repeat):
        for prompt in prompts:
            began = time.perf_counter_ns()
            matches = index.find(prompt)
            costs.append((time.perf_counter_ns() - began) / 1e6)
            found += bool(matches)
    return {
        "subjects": len(subjects),
        "keys": index.size,
        "build_seconds": round(build_s, 3),
        "prompts": len(prompts) * args.repeat,
        "prompts_with_a_subject": found,
        "p50_ms": round(percentile(costs, 0.5), 4),
        "p99_ms": round(percentile(costs, 0.99), 4),
        "max_ms": round(max(costs), 4),
        "mean_ms": round(statistics.fmean(costs), 4),
    }


def build_massive_pack(
    facts: Sequence[Fact], backbone: Backbone, hypernet_path: Path, packs_dir: Path, name: str
) -> dict[str, Any]:
    """Publish the 10,000-fact pack from trained hypernetwork weights: the subject table and
    the gate table are recomputed (the blocks are a function of the weights), as the worker's
    growth first does."""
    from server.builder.edits import backbone_info
    from server.builder.version import BuildPolicy, StartingPoint, build_version
    from server.gate.encoder import SentenceEncoder
    from server.packs import PackStore

    started = time.perf_counter()
    start = StartingPoint(load_file(str(hypernet_path)), frozenset(map(fact_key, facts)))
    candidate = build_version(
        backbone, facts, SentenceEncoder(), start, BuildPolicy(quality_gate=False)
    )
    manifest = PackStore(packs_dir).publish(name, candidate.content, backbone_info(backbone))
    return {"pack": manifest.name, "build_seconds": round(time.perf_counter() - started, 1)}


def general_ability(backbone: Backbone, edit_set: Any, path: Path) -> dict[str, Any]:
    """Greedy answers to simple prompts (bench/general_ability.jsonl) with and without the
    pack, through the serving engine: accuracy per set, and how many answers the pack changed."""
    from server.engine.engine import BatchEngine, EngineRequest
    from server.engine.sampling import SamplingParams

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    engine = BatchEngine(backbone)
    params = SamplingParams(max_tokens=8)
    plain = engine.generate([EngineRequest(r["prompt"], params) for r in rows])
    edited = engine.generate(
        [EngineRequest(r["prompt"], params, edit_sets=[edit_set]) for r in rows]
    )
    result: dict[str, Any] = {}
    for name in sorted({r["set"] for r in rows}):
        mine = [i for i, r in enumerate(rows) if r["set"] == name]

        def score(outputs: Sequence[Any], mine: list[int] = mine) -> float:
            hits = [rows[i]["answer"].lower() in outputs[i].text.lower() for i in mine]
            return round(100 * sum(hits) / len(mine), 1)

        result[name] = {
            "prompts": len(mine),
            "naming_an_edited_subject": sum(
                bool(edit_set.index.find(rows[i]["prompt"])) for i in mine
            ),
            "edits_applied": sum(bool(edited[i].edits_applied) for i in mine),
            "unedited_score": score(plain),
            "edited_score": score(edited),
            "answers_changed": sum(plain[i].text != edited[i].text for i in mine),
        }
    return result


def edited_answers(
    backbone: Backbone, edit_set: Any, facts: Sequence[Fact], *, tokens: int = 8
) -> dict[str, Any]:
    """The facts' own prompts through the serving engine with the pack: how often the gate
    opened and the greedy answer starts with the new target."""
    from server.engine.engine import BatchEngine, EngineRequest
    from server.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens)
    requests = [EngineRequest(f.prompt, params, edit_sets=[edit_set]) for f in facts]
    outputs = BatchEngine(backbone).generate(requests)
    return {
        "prompts": len(facts),
        "edits_applied": sum(bool(o.edits_applied) for o in outputs),
        "starts_with_target": sum(
            o.text.strip().startswith(f.target.strip()) for o, f in zip(outputs, facts, strict=True)
        ),
    }


def cmd_serve(args: argparse.Namespace, settings: Settings, backbone: Backbone) -> dict:
    """Pack build, load time and memory, general ability, then throughput through `lks serve`."""
    from harness import start_server
    from serve import load_run

    from server.gate.encoder import SentenceEncoder
    from server.packs import PackStore
    from server.packs.edit_set import load_edit_set
    from server.packs.names import PackRef

    packs_dir = args.packs_dir or Path(tempfile.mkdtemp(prefix="lks-massive-packs-"))
    store = PackStore(packs_dir)
    built = {}
    if not store.versions("massive"):
        facts = [it.fact for it in dev_items(settings, args.zsre, args.counterfact)]
        weights = args.hypernet or default_weights(settings)
        built = build_massive_pack(facts, backbone, weights, packs_dir, "massive")
    ref = store.resolve(PackRef("massive"))
    encoder = SentenceEncoder()
    process = psutil.Process()
    rss_before = process.memory_info().rss
    started = time.perf_counter()
    edit_set = load_edit_set(store.load(ref), backbone, encoder)
    load_s = time.perf_counter() - started
    rss_after = process.memory_info().rss
    record: dict[str, Any] = {
        **built,
        "subjects": len(edit_set.subjects),
        "pack_mib_on_disk": round(
            sum(f.stat().st_size for f in store.path(ref).iterdir()) / 2**20, 1
        ),
        "pack_load_seconds": round(load_s, 2),
        "pack_load_rss_mib": round((rss_after - rss_before) / 2**20, 1),
        "general_ability": general_ability(backbone, edit_set, args.ability),
    }
    items = dev_items(settings, args.zsre, args.counterfact)
    sample = [it.fact for it in items[:: max(1, len(items) // args.check)]]
    record["own_prompts"] = edited_answers(backbone, edit_set, sample)
    prompts = [it.fact.prompt for it in items[:: len(items) // args.requests]][: args.requests]
    server = start_server(packs_dir, args.port)
    url = f"http://127.0.0.1:{args.port}"
    try:
        asyncio.run(load_run(url, [("warm-up", prompts[0], "massive")] * 4, 2, 4))
        # no pack and the pack alternate request by request: drift falls on both alike
        pairs = [r for p in prompts for r in (("no pack", p, None), ("pack", p, "massive"))]
        _, done = asyncio.run(load_run(url, pairs, 1, args.tokens))
    finally:
        server.terminate()
        server.wait(timeout=30)
    rate = {}
    for label in ("no pack", "pack"):
        mine = [d for d in done if d.label == label]
        rate[label] = sum(d.tokens for d in mine) / sum(d.latency for d in mine)
    record.update(
        requests_each=len(prompts),
        tokens_per_request=args.tokens,
        tokens_per_s_no_pack=round(rate["no pack"], 2),
        tokens_per_s_pack=round(rate["pack"], 2),
        throughput_ratio=round(rate["pack"] / rate["no pack"], 3),
    )
    return record


def report(directory: Path) -> str:
    """The massive-editing table (docs/results/massive.md), from the JSON the subcommands wrote."""

    def load(name: str) -> dict[str, Any]:
        path = directory / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    train, compare, grow = load("train"), load("compare"), load("grow")
    grow_published = load("grow_published")
    detect, serve = load("detect"), load("serve")
    lines = ["| what | measured |", "|---|---|"]
    if train:
        lines.append(
            f"| train {train['facts']:,} facts ({train.get('subjects', '?')} subjects), "
            f"{train['device']} | {train.get('train_seconds', '?')} s, {train.get('epochs_run')} "
            f"epochs, reliability {train.get('reliability')} on {train.get('reliability_sample')} "
            f"of them, peak RSS {train['peak_rss_gib']} GiB (anonymous "
            f"{train.get('peak_anonymous_rss_gib', '?')} GiB; the rest is the mapped cache), "
            f"repetition weight {train.get('repetition_weight', 0.0)} |"
        )
    if compare:
        bound = ">= " if compare["speedup_is_lower_bound"] else ""
        lines.append(
            f"| ours vs reference loop, {compare['facts']:,} facts, {compare['device']} | "
            f"ours {compare['ours_train_seconds']} s to reliability "
            f"{compare['ours_reliability']}; reference {compare['reference_train_seconds']} s "
            f"({compare['reference_epochs']} epochs) to "
            f"{compare['reference_curve'][-1]['reliability']:.4f}: speedup {bound}"
            f"{compare['speedup']}x |"
        )
    if grow:
        lines.append(
            f"| add {grow['facts_added']} facts to {grow['facts_before']:,}: the previous "
            f"weights as they are (the worker's first try) | new facts' reliability "
            f"{grow['new_reliability_before']}, earlier facts unchanged; costs one feature pass "
            f"over every subject ({grow['feature_pass_seconds']} s) |"
        )
        lines.append(
            f"| ... or warm start + replay ({grow['facts_trained']} facts trained) | "
            f"{grow['grow_train_seconds']} s"
            + (
                f" ({grow['fraction_of_full']:.1%} of the full run)"
                if "fraction_of_full" in grow
                else ""
            )
            + f"; new facts {grow['new_reliability_after']}; earlier facts' reliability "
            f"{grow['old_reliability_before']} -> {grow['old_reliability_after']}, generality "
            f"{grow['old_generality_before']} -> {grow['old_generality_after']} |"
        )
    if grow_published:
        fraction = grow_published.get("fraction_of_full")
        lines.append(
            f"| add {grow_published['facts_added']} facts to {grow_published['facts_before']:,} "
            f"as the worker does: the previous weights, reusing the published version's blocks "
            f"and gate embeddings | {grow_published['grow_seconds']} s"
            + (f" ({fraction * 100:.2g}% of the full run)" if fraction is not None else "")
            + f": {grow_published['subjects_computed']} new subjects computed, "
            f"{grow_published['subjects_reused']:,} reused (blocks differ by at most "
            f"{grow_published['earlier_blocks_max_difference']:.1e}); new facts' reliability "
            f"{grow_published['new_reliability']} |"
        )
    if detect:
        lines.append(
            f"| detect over {detect['subjects']:,} subjects + aliases ({detect['keys']:,} keys), "
            f"{detect['prompts']:,} prompts | p50 {detect['p50_ms']} ms, p99 {detect['p99_ms']} ms,"
            f" max {detect['max_ms']} ms |"
        )
    if serve:
        lines.append(
            f"| serve, concurrency 1, {serve['requests_each']} requests each | "
            f"{serve['tokens_per_s_pack']} tokens/s with the {serve['subjects']:,}-subject pack vs "
            f"{serve['tokens_per_s_no_pack']} without: {serve['throughput_ratio']}x |"
        )
        lines.append(
            f"| pack | {serve['pack_mib_on_disk']} MiB on disk, loads in "
            f"{serve['pack_load_seconds']} s, +{serve['pack_load_rss_mib']} MiB RSS |"
        )
        if "own_prompts" in serve:
            own = serve["own_prompts"]
            lines.append(
                f"| the pack on {own['prompts']} of its own prompts (greedy, through the engine) "
                f"| gate open on {own['edits_applied']}, answer starts with the new target on "
                f"{own['starts_with_target']} |"
            )
        for name, row in serve["general_ability"].items():
            lines.append(
                f"| general ability, {name} prompts ({row['prompts']}, "
                f"{row['naming_an_edited_subject']} name an edited subject) | unedited "
                f"{row['unedited_score']}, edited {row['edited_score']}; "
                f"{row['edits_applied']} edits applied, {row['answers_changed']} answers changed |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("report", help="print the Markdown table from --out's JSON files")
    table.add_argument("--out", type=Path, default=Path(__file__).with_name("massive"))
    # what train and grow train with (grow's replay should match the run it grows)
    loss_args = argparse.ArgumentParser(add_help=False)
    loss_args.add_argument(
        "--repetition-weight",
        type=float,
        default=TrainConfig().repetition_weight,
        help="TrainConfig.repetition_weight (docs/results/massive.md's run: 0, the default then)",
    )
    loss_args.add_argument(
        "--hypernet-kind",
        choices=get_args(HypernetKind),
        default=TrainConfig().hypernet,
        help="TrainConfig.hypernet (docs/results/massive.md's run: linear, the default then)",
    )
    train = sub.add_parser("train", parents=[loss_args])
    train.add_argument("--zsre", type=int, default=8000)
    train.add_argument("--counterfact", type=int, default=2000)
    train.add_argument("--max-steps", type=int, default=0, help="stop early and extrapolate")
    train.add_argument("--max-seconds", type=float, default=0, help="... or after this long")
    train.add_argument("--cache-gib", type=float, default=4.0, help="activation cache budget")
    train.add_argument("--weights", type=Path, help="where to save the trained hypernetwork")
    train.add_argument("--check", type=int, default=1000, help="facts to check reliability on")
    compare = sub.add_parser("compare")
    compare.add_argument("--n", type=int, default=1000)
    compare.add_argument("--tolerance", type=float, default=0.005)
    compare.add_argument("--max-reference-epochs", type=int, default=20)
    compare.add_argument("--max-reference-seconds", type=float, default=3600)
    compare.add_argument("--stop-ratio", type=float, default=3.5, help="x our training time")
    # the trained pack and its growth: shared by grow, grow-published and serve
    pack_args = argparse.ArgumentParser(add_help=False)
    pack_args.add_argument("--hypernet", type=Path, help="trained weights (default: train's)")
    pack_args.add_argument("--zsre", type=int, default=8000)
    pack_args.add_argument("--counterfact", type=int, default=2000)
    growth_args = argparse.ArgumentParser(add_help=False, parents=[pack_args])
    growth_args.add_argument("--new", type=int, default=100, help="CounterFact dev facts to add")
    growth_args.add_argument("--full-train-json", type=Path, help="the full run's train.json")
    grow = sub.add_parser("grow", parents=[growth_args, loss_args])
    grow.add_argument("--check", type=int, default=1000, help="earlier facts to check")
    grow_published = sub.add_parser("grow-published", parents=[growth_args])
    grow_published.add_argument("--packs-dir", type=Path, required=True, help="serve's pack store")
    detect = sub.add_parser("detect")
    detect.add_argument("--repeat", type=int, default=3)
    serve = sub.add_parser("serve", parents=[pack_args])
    serve.add_argument("--check", type=int, default=200, help="own prompts to generate for")
    serve.add_argument("--packs-dir", type=Path, help="reuse the pack built by an earlier run")
    serve.add_argument(
        "--ability", type=Path, default=Path(__file__).with_name("general_ability.jsonl")
    )
    serve.add_argument(
        "--requests", type=int, default=64, help="requests each, with and without the pack"
    )
    serve.add_argument("--tokens", type=int, default=32)
    serve.add_argument("--port", type=int, default=8766)
    for command in (train, compare, grow, grow_published, detect, serve):
        command.add_argument("--out", type=Path, help="write the JSON result (and files) here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "report":
        print(report(args.out))
        return 0
    # float32 throughout, as docs/results/massive.md was measured (training is float32 anyway)
    settings = Settings(dtype="float32")
    backbone = None if args.command == "detect" else load_backbone(settings)
    handler = {
        "train": cmd_train,
        "compare": cmd_compare,
        "grow": cmd_grow,
        "grow-published": cmd_grow_published,
        "detect": cmd_detect,
        "serve": cmd_serve,
    }
    result = handler[args.command](args, settings, backbone)  # type: ignore[arg-type]
    text = json.dumps(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.command.replace('-', '_')}.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
