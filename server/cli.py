"""`lks`: the command line. Thin: parse, build objects from one Settings, call the library.

Errors end the command with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from pydantic import ValidationError

from server.editor.config import HypernetKind, TrainConfig
from server.packs.errors import PackError
from server.packs.names import PackRef, validate_name
from server.settings import Settings

if TYPE_CHECKING:
    from server.packs.store import PackStore

log = logging.getLogger("lks")


class CLIError(Exception):
    """A user-facing failure: the message says what to fix."""


def _settings(**overrides: Any) -> Settings:
    """The command's settings, read once; LKS_CPU_THREADS applies from here on (to this thread
    and, in `lks serve`, to the engine's)."""
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CLIError(f"invalid settings: {problems}") from None
    if settings.cpu_threads is not None:
        import torch

        torch.set_num_threads(settings.cpu_threads)
    return settings


def _pack_store(settings: Settings) -> PackStore:
    """The settings' pack store; imported here, as every heavy module is, so that commands
    that need neither a model nor a pack (`lks keys`, `--help`) start without torch."""
    from server.packs.store import PackStore

    return PackStore.from_settings(settings)


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    pack_ref = PackRef.parse(args.pack) if args.pack else None  # refuse bad names before loading
    settings = _settings()
    _configure_logging(settings)
    from transformers.utils import logging as hf_logging

    from server.engine.engine import BatchEngine, EngineRequest
    from server.engine.sampling import SamplingParams
    from server.model import load_backbone

    hf_logging.disable_progress_bar()
    store = _pack_store(settings)
    pack = store.load(pack_ref) if pack_ref is not None else None  # fail before the model loads
    backbone = load_backbone(settings)
    edit_sets = []
    if pack is not None:
        from server.gate.encoder import SentenceEncoder
        from server.packs.edit_set import load_edit_set

        edit_sets.append(load_edit_set(pack, backbone, SentenceEncoder()))
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
    )
    text = (
        backbone.render_chat([{"role": "user", "content": args.prompt}])
        if args.chat
        else args.prompt
    )
    request = EngineRequest(text, params, templated=args.chat, edit_sets=edit_sets)
    engine = BatchEngine(
        backbone, max_batch_size=1, release_answered_edits=settings.release_answered_edits
    )
    (result,) = engine.generate([request])
    print(result.text)
    if result.edits_applied:
        log.info("edits applied: %s", ", ".join(result.edits_applied))
    return 0


def _progress_bar(total_label: str) -> Callable[[Any], None]:
    """A tqdm bar on a terminal, fed by the trainer's structured progress events."""
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(event: Any) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=event.steps, desc=total_label, unit="step", leave=False)
        bar["bar"].n = event.step
        bar["bar"].set_postfix(epoch=event.epoch, loss=f"{event.loss:.3f}", refresh=False)
        bar["bar"].refresh()

    return update


def _weight(text: str) -> float:
    """A loss weight from the command line: a number, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def _contexts(text: str) -> tuple[str, ...]:
    """Answer contexts from the command line: a comma-separated list, or none."""
    from server.editor.answers import CONTEXTS

    if text.strip() == "none":
        return ()
    chosen = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in chosen if c not in CONTEXTS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"{text!r}: choose from {', '.join(CONTEXTS)} (comma-separated), or none"
        )
    return chosen


def _teacher_contexts(text: str) -> tuple[str, ...]:
    chosen = tuple(c.strip() for c in text.split(",") if c.strip())
    if not chosen or any(c not in ("chat", "free", "bare") for c in chosen):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from chat, free, bare")
    return chosen


def _train_config(args: argparse.Namespace) -> TrainConfig:
    names = (
        "epochs",
        "lr",
        "layer",
        "seed",
        "continuation_weight",
        "repetition_weight",
        "teacher_repetition_weight",
        "teacher_weight",
        "bare_teacher_weight",
        "teacher_contexts",
        "teacher_tokens",
        "rephrase",
        "hypernet",
    )
    overrides = {k: getattr(args, k) for k in names}
    return TrainConfig(**{k: v for k, v in overrides.items() if v is not None})


def cmd_train(args: argparse.Namespace) -> int:
    from server.editor.facts import parse_facts_jsonl
    from server.packs.names import validate_name

    validate_name(args.pack)
    try:
        text = Path(args.facts).read_text()
    except OSError as exc:
        raise CLIError(f"cannot read {args.facts}: {exc.strerror}") from None
    parsed = parse_facts_jsonl(text, later_wins=args.later_wins)
    problems = parsed.errors + parsed.conflicts
    if problems:
        for problem in problems:
            print(f"{args.facts}: {problem}", file=sys.stderr)
        raise CLIError(f"{len(problems)} bad line(s) in {args.facts}; nothing was trained")
    if not parsed.facts:
        raise CLIError(f"{args.facts} holds no facts")
    settings = _settings()
    _configure_logging(settings)
    from transformers.utils import logging as hf_logging

    from server.builder.edits import backbone_info
    from server.builder.version import BuildPolicy, build_version, latest_start
    from server.gate.encoder import SentenceEncoder
    from server.model import load_backbone, load_training_backbone

    hf_logging.disable_progress_bar()
    policy = BuildPolicy.from_settings(
        settings,
        train=_train_config(args),
        warm_start=args.warm_start,
        growth=args.growth,
        reuse=args.reuse,
        quality_gate=args.quality_gate,
    )
    store = _pack_store(settings)
    backbone = load_backbone(settings)
    start = latest_start(store, args.pack, backbone, policy.train)
    candidate = build_version(
        backbone,
        parsed.facts,
        SentenceEncoder(),
        start,
        policy,
        training=load_training_backbone(settings, backbone),
        progress=_progress_bar("training") if sys.stderr.isatty() else None,
    )
    if candidate.rejection is not None:
        raise CLIError(
            f"{candidate.rejection}; nothing was published (--no-quality-gate publishes anyway)"
        )
    manifest = store.publish(args.pack, candidate.content, backbone_info(backbone))
    metrics = candidate.metrics
    checked = (
        f"reliability {metrics['reliability']:.3f}" if "reliability" in metrics else "not checked"
    )
    warm = f", warm start from {start.source}" if metrics["warm_start"] else ""
    print(
        f"published {manifest.name}@{manifest.version}: {manifest.subject_count} subjects, "
        f"{len(parsed.facts)} facts, {checked}, "
        f"trained in {candidate.edits.result.seconds:.0f} s{warm}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    settings = _settings()
    _configure_logging(settings)
    from transformers.utils import logging as hf_logging

    from server.builder.edits import train_edits
    from server.evaluation.datasets import (
        dataset_path,
        describe_protocol,
        load_items,
        training_facts,
    )
    from server.evaluation.evaluate import GenerationSample, evaluate
    from server.gate.encoder import SentenceEncoder
    from server.model import load_backbone, load_training_backbone
    from server.model.cpu_layout import has_bfloat16_linears

    hf_logging.disable_progress_bar()
    if args.samples is not None and not args.samples.parent.is_dir():  # before, not after, training
        raise CLIError(f"--samples: no such directory {args.samples.parent}")
    try:
        items = load_items(
            dataset_path(settings.data_dir, args.dataset), args.split, args.n, args.offset
        )
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    backbone = load_backbone(settings)
    config = _train_config(args)
    training = load_training_backbone(settings, backbone)
    edits = train_edits(
        training,  # the copy training runs on (load_training_backbone); evaluated as served
        training_facts(items, args.protocol),
        SentenceEncoder(),
        config,
        progress=_progress_bar("training") if sys.stderr.isatty() else None,
        cache_budget_bytes=settings.train_cache_mb << 20,
    )
    result, edit_set = edits.result, edits.edit_set
    samples: list[GenerationSample] | None = [] if args.samples is not None else None
    answers: list[dict[str, Any]] | None = [] if args.samples is not None else None
    metrics = evaluate(
        backbone,
        items,
        edit_set,
        samples=samples,
        contexts=args.contexts,
        answer_samples=answers,
        release=settings.release_answered_edits,
    )
    if samples is not None and answers is not None:
        # one file: the answers in each context, then the bare continuations behind exact match
        # and fluency (context "continuation")
        opener = gzip.open if args.samples.suffix == ".gz" else open
        with opener(args.samples, "wt") as out:
            out.writelines(json.dumps(record) + "\n" for record in answers)
            out.writelines(
                json.dumps({"context": "continuation", **dataclasses.asdict(s)}) + "\n"
                for s in samples
            )
    report = {
        "dataset": args.dataset,
        "split": args.split,
        "n": args.n,
        "offset": args.offset,
        "protocol": args.protocol,
        **{k: round(v, 4) for k, v in metrics.items()},
        "train_seconds": round(result.seconds, 1),
        "train_cpu_seconds": round(result.cpu_seconds, 1),
        "epochs_run": result.epochs_run,
        # the after-target terms change fluency and generality: each row says what it used
        "continuation_weight": config.continuation_weight,
        "repetition_weight": config.repetition_weight,
        "teacher_repetition_weight": config.teacher_repetition_weight,
        "teacher_weight": config.teacher_weight,
        "bare_teacher_weight": config.bare_teacher_weight,
        "teacher_contexts": ",".join(config.teacher_contexts),
        "teacher_tokens": config.teacher_tokens,
        "rephrase": config.rephrase,
        "epochs": config.epochs,
        "lr": config.lr,
        "hypernet": config.hypernet,
        # which relation head the gate used (generality and locality depend on it)
        "gate_threshold": round(float(edits.gate_table.threshold), 4),
        "contexts": ",".join(args.contexts),
        "release_answered_edits": settings.release_answered_edits,
        "dtype": str(backbone.dtype).removeprefix("torch."),
        "train_dtype": (
            "mixed"
            if has_bfloat16_linears(training.model)
            else str(training.dtype).removeprefix("torch.")
        ),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            shown = describe_protocol(value) if key == "protocol" else value
            print(f"{key:>22}  {shown}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api import create_app
    from server.api.auth import KeysFileError

    settings = _settings(host=args.host, port=args.port)
    _configure_logging(settings)
    try:
        app = create_app(settings)
    except KeysFileError as exc:  # auth was asked for: never serve without it
        raise CLIError(f"not serving: {exc}") from None
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """A training worker as its own process: any number of them can share one database."""
    import signal
    import threading

    from server.jobs.store import JobStore, StoreUnavailableError
    from server.jobs.worker import Worker, WorkerConfig
    from server.model import load_backbone, load_training_backbone

    settings = _settings()
    _configure_logging(settings)
    store = JobStore(settings.jobs_database_url)
    try:
        store.migrate()
    except StoreUnavailableError as exc:
        if args.once:  # one job now or a clear error: there is no later to wait for
            raise CLIError(str(exc)) from exc
        # a worker that starts before its database (a restart, an orchestrator's order) waits
        # for it: each poll retries, and the first that reaches it migrates
        log.warning("the jobs database is not reachable yet (%s); retrying as it polls", exc)
    backbone = load_backbone(settings)
    config = WorkerConfig.from_settings(settings)
    worker = Worker(
        store,
        _pack_store(settings),
        backbone,
        config,
        training_factory=lambda: load_training_backbone(settings, backbone),
    )
    if args.metrics_port:  # a worker process exports its own training metrics
        from prometheus_client import start_http_server

        from server.api.metrics import ServerMetrics

        metrics = ServerMetrics()
        worker.on_finished = metrics.observe_job
        start_http_server(args.metrics_port, addr=settings.host, registry=metrics.registry)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if args.once:
        worker.run_once()
    else:
        worker.run_forever(stop)
    store.close()
    return 0


def _keys_file() -> Path:
    settings = _settings()
    if settings.api_keys_file is None:
        raise CLIError("set LKS_API_KEYS_FILE to the key file (auth turns on with it)")
    return settings.api_keys_file


def cmd_keys_add(args: argparse.Namespace) -> int:
    """Create an API key: its hash goes to LKS_API_KEYS_FILE, the key is printed once."""
    from server.api.auth import KeysFileError, add_key

    keys_file = _keys_file()
    packs = [validate_name(p) for p in args.packs.split(",")] if args.packs else ["*"]
    try:
        key = add_key(keys_file, args.name, args.role, packs, args.rpm)
    except (ValueError, KeysFileError) as exc:  # pydantic's ValidationError is a ValueError
        raise CLIError(_one_line(exc)) from None
    print(key)
    return 0


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return str(exc)


def cmd_keys_list(args: argparse.Namespace) -> int:
    """The keys by name, role, packs and rate; never their hashes."""
    from server.api.auth import KeysFileError, stored_keys

    keys_file = _keys_file()
    try:
        records = stored_keys(keys_file)
    except KeysFileError as exc:
        raise CLIError(str(exc)) from None
    rows = [r.model_dump(exclude={"sha256"}) for r in records]
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print(f"no keys in {keys_file}")
    else:
        width = max(len(r["name"]) for r in rows)
        for row in rows:
            rpm = row["requests_per_minute"]
            print(
                f"{row['name']:<{width}}  {row['role']:<5}  packs {','.join(row['packs'])}"
                f"  {f'{rpm} rpm' if rpm else 'no rate limit'}"
            )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Remove a key; a running server refuses it from its next request (no restart)."""
    from server.api.auth import KeysFileError, revoke_key

    keys_file = _keys_file()
    try:
        left = revoke_key(keys_file, args.name)
    except (ValueError, KeysFileError) as exc:
        raise CLIError(str(exc)) from None
    print(f"revoked key {args.name!r}; {len(left)} key(s) left in {keys_file}")
    if not left:
        log.warning(
            "%s holds no keys now: a server refuses every request, and will not start", keys_file
        )
    return 0


def cmd_pack_list(args: argparse.Namespace) -> int:
    store = _pack_store(_settings())
    rows = []
    for name in store.names():
        versions = store.versions(name)
        if not versions:
            continue
        try:
            manifest = store.manifest(PackRef(name))
            detail = f"{manifest.subject_count} subjects  {manifest.backbone.name}"
        except PackError as exc:
            detail = f"UNREADABLE: {exc}"
        rows.append((name, ",".join(map(str, versions)), detail))
    if args.json:
        print(json.dumps([{"name": n, "versions": v, "latest": d} for n, v, d in rows]))
    elif not rows:
        # the store is relative to the working directory: say which one, and how to choose
        print(f"no packs in {store.root.resolve()} (LKS_PACKS_DIR sets the pack store)")
    else:
        width = max(len(r[0]) for r in rows)
        for name, versions, detail in rows:
            print(f"{name:<{width}}  versions {versions}  {detail}")
    return 0


def cmd_pack_show(args: argparse.Namespace) -> int:
    store = _pack_store(_settings())
    pack = store.load(PackRef.parse(args.ref))  # full validation: checksums, tensors, shapes
    info = pack.manifest.model_dump(mode="json")
    info["path"] = str(pack.path)
    info["facts"] = len(pack.content.facts)
    print(json.dumps(info, indent=2))
    return 0


class _Deprecated(argparse.Action):
    """An old flag spelling: accepted, with a warning naming the new one."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        new = "--" + self.dest.replace("_", "-")
        log.warning("%s is deprecated; use %s", option_string, new)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lks",
        description="lks-server: one resident LLM, hot-swappable LKS edit packs. "
        "Settings come from LKS_* environment variables (LKS_MODEL, LKS_PACKS_DIR, ...).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate text from a prompt")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--pack", help="edit pack to apply, NAME or NAME@VERSION")
    generate.add_argument(
        "--max-tokens", type=int, default=32, help="most tokens to generate (as the API's)"
    )
    generate.add_argument(  # the old spelling, still accepted, no longer shown
        "--max-new-tokens",
        type=int,
        dest="max_tokens",
        default=argparse.SUPPRESS,
        action=_Deprecated,
        help=argparse.SUPPRESS,
    )
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--chat", action="store_true", help="use the model's chat template")
    generate.set_defaults(handler=cmd_generate, command_parser=generate)

    def add_train_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--epochs",
            type=int,
            help=f"epochs to plan (default {TrainConfig.epochs}); a small fact set gets more, to "
            f"make at least {TrainConfig.min_steps} steps (the manifest records the number "
            "planned); early stop may end sooner",
        )
        command.add_argument("--lr", type=float, help="hypernetwork learning rate")
        command.add_argument(
            "--hypernet",
            choices=get_args(HypernetKind),
            help="the hypernetwork: one linear map, an MLP hidden -> 4*hidden -> hidden, or "
            f"the two added, the MLP learning slower (default {TrainConfig.hypernet})",
        )
        command.add_argument("--layer", type=int, help="decoder layer to edit")
        command.add_argument("--seed", type=int)
        command.add_argument(
            "--continuation-weight",
            type=_weight,
            help="KL to the unedited continuation after each new target (default 0: off)",
        )
        command.add_argument(
            "--repetition-weight",
            type=_weight,
            help="unlikelihood of saying the new target again after it (default 0: off)",
        )
        command.add_argument(
            "--teacher-repetition-weight",
            type=_weight,
            help="unlikelihood of saying the new target again in the chat teacher's answer "
            f"(default {TrainConfig.teacher_repetition_weight})",
        )
        command.add_argument(
            "--teacher-weight",
            type=_weight,
            help="KL to the unedited model's answer when told the fact (default "
            f"{TrainConfig.teacher_weight}; 0: the teacher is off)",
        )
        command.add_argument(
            "--bare-teacher-weight",
            type=_weight,
            help="the same KL over the bare prompt's answer (default "
            f"{TrainConfig.bare_teacher_weight})",
        )
        command.add_argument(
            "--teacher-tokens", type=int, help="the teacher's answer is cut after this many tokens"
        )
        command.add_argument(
            "--teacher-contexts",
            type=_teacher_contexts,
            metavar="LIST",
            help="where the teacher answers: comma-separated of chat (after the target), "
            "free (chat, its own sentence), bare",
        )
        command.add_argument(
            "--rephrase",
            action=argparse.BooleanOptionalAction,
            default=None,
            help='also train each prompt with its relation moved ("the Y of S" <-> "S\'s Y") '
            "and a statement asked as a question (default on)",
        )

    train = commands.add_parser("train", help="train a new version of a pack from facts (JSONL)")
    train.add_argument("--facts", required=True, help='JSONL: {"subject","prompt","target"} a line')
    train.add_argument("--pack", required=True, help="pack name; a new version is published")
    train.add_argument(
        "--later-wins", action="store_true", help="a later conflicting fact replaces the earlier"
    )
    for flag, what in (
        ("warm-start", "start from the latest version's weights when the fact set only grew"),
        (
            "growth",
            "on a grown set, first try those weights as they are, then train the new "
            "facts and a replay sample",
        ),
        ("reuse", "take the blocks and gate embeddings of unchanged subjects from it"),
        ("quality-gate", "refuse a version under LKS_PUBLISH_MIN_RELIABILITY / _LOCALITY"),
    ):
        dest = flag.replace("-", "_")
        train.add_argument(f"--no-{flag}", dest=dest, action="store_false", help=f"do not {what}")
    add_train_options(train)
    train.set_defaults(handler=cmd_train, command_parser=train)

    evaluate = commands.add_parser(
        "eval", help="train a fresh pack on benchmark items and measure it"
    )
    evaluate.add_argument("--dataset", required=True, help="zsre, counterfact, or a .json path")
    evaluate.add_argument("--split", choices=["dev", "test"], default="dev")
    evaluate.add_argument("--n", type=int, default=100)
    evaluate.add_argument("--offset", type=int, default=0, help="first item within the split")
    evaluate.add_argument(
        "--protocol",
        choices=["heldout", "reference"],
        default="heldout",
        help="heldout: training reads only subject, prompt and target; reference: training also "
        "holds each item's locality prompt to the unedited answer (as the LKS reference code), "
        "so locality is measured on prompts training saw",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument(
        "--samples",
        type=Path,
        metavar="PATH",
        help="write each item's edited and unedited answers in each context, and its bare "
        "continuations (JSONL), to PATH (gzip-compressed where PATH ends in .gz)",
    )
    evaluate.add_argument(
        "--contexts",
        type=_contexts,
        default="bare,qa,chat",  # a string: converted by _contexts when `eval` parses it
        metavar="LIST",
        help="where answers are generated and judged: comma-separated of bare, qa, chat "
        "(default all three), or none",
    )
    add_train_options(evaluate)
    evaluate.set_defaults(handler=cmd_eval, command_parser=evaluate)

    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(handler=cmd_serve, command_parser=serve)

    worker = commands.add_parser(
        "worker", help="run a training worker (jobs from LKS_DATABASE_URL) until interrupted"
    )
    worker.add_argument("--once", action="store_true", help="run at most one job, then exit")
    worker.add_argument("--metrics-port", type=int, help="serve this worker's /metrics here")
    worker.set_defaults(handler=cmd_worker, command_parser=worker)

    keys = commands.add_parser("keys", help="manage API keys (LKS_API_KEYS_FILE)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    key_add = key_commands.add_parser("add", help="create a key and print it (once)")
    key_add.add_argument("--name", required=True)
    key_add.add_argument("--role", choices=["read", "write", "admin"], required=True)
    key_add.add_argument("--packs", help="comma-separated pack names it may use (default: all)")
    key_add.add_argument("--rpm", type=int, help="requests per minute (default: unlimited)")
    key_add.set_defaults(handler=cmd_keys_add, command_parser=key_add)
    key_list = key_commands.add_parser("list", help="list the keys (names, roles, packs)")
    key_list.add_argument("--json", action="store_true")
    key_list.set_defaults(handler=cmd_keys_list, command_parser=key_list)
    key_revoke = key_commands.add_parser(
        "revoke", help="remove a key; a running server refuses it at once"
    )
    key_revoke.add_argument("name", metavar="NAME")
    key_revoke.set_defaults(handler=cmd_keys_revoke, command_parser=key_revoke)

    pack = commands.add_parser("pack", help="inspect the pack store")
    pack_commands = pack.add_subparsers(dest="pack_command", required=True, metavar="ACTION")
    pack_list = pack_commands.add_parser("list", help="list packs and their versions")
    pack_list.add_argument("--json", action="store_true")
    pack_list.set_defaults(handler=cmd_pack_list, command_parser=pack_list)
    pack_show = pack_commands.add_parser("show", help="validate a pack and print its manifest")
    pack_show.add_argument("ref", metavar="NAME[@VERSION]")
    pack_show.set_defaults(handler=cmd_pack_show, command_parser=pack_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # argparse would print the top-level usage; the command's own says more
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (CLIError, PackError) as exc:
        print(f"lks: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # model files missing or unloadable: one line, not a traceback
        from server.gate.encoder import EncoderMissingError
        from server.jobs.store import StoreUnavailableError
        from server.model import ModelLoadError

        if isinstance(exc, ModelLoadError | EncoderMissingError | StoreUnavailableError):
            print(f"lks: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
