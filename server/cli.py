"""`lks`: the command line. Thin: parse, build objects from one Settings, call the library.

Errors end the command with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from server.packs import PackError, PackRef, PackStore
from server.settings import Settings

log = logging.getLogger("lks")


class CLIError(Exception):
    """A user-facing failure: the message says what to fix."""


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CLIError(f"invalid settings: {problems}") from None


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

    from server.engine.generate import Generator, SamplingParams
    from server.model import load_backbone

    hf_logging.disable_progress_bar()
    store = PackStore(settings.packs_dir)
    if pack_ref is not None:
        store.resolve(pack_ref)  # unknown pack or version: fail before the model loads
    backbone = load_backbone(settings)
    if pack_ref is not None:
        raise CLIError("applying packs arrives with the editor; run without --pack for now")
    generator = Generator(backbone)
    params = SamplingParams(
        max_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
    )
    text = generator.prompt_text(args.prompt, chat=args.chat)
    result = generator.generate(text, params, templated=args.chat)
    print(result.text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api import create_app

    settings = _settings(host=args.host, port=args.port)
    _configure_logging(settings)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
    )
    return 0


def cmd_pack_list(args: argparse.Namespace) -> int:
    store = PackStore(_settings().packs_dir)
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
        print(f"no packs in {store.root}")
    else:
        width = max(len(r[0]) for r in rows)
        for name, versions, detail in rows:
            print(f"{name:<{width}}  versions {versions}  {detail}")
    return 0


def cmd_pack_show(args: argparse.Namespace) -> int:
    store = PackStore(_settings().packs_dir)
    pack = store.load(PackRef.parse(args.ref))  # full validation: checksums, tensors, shapes
    info = pack.manifest.model_dump(mode="json")
    info["path"] = str(pack.path)
    info["facts"] = len(pack.content.facts)
    print(json.dumps(info, indent=2))
    return 0


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
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--chat", action="store_true", help="use the model's chat template")
    generate.set_defaults(handler=cmd_generate)

    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(handler=cmd_serve)

    pack = commands.add_parser("pack", help="inspect the pack store")
    pack_commands = pack.add_subparsers(dest="pack_command", required=True, metavar="ACTION")
    pack_list = pack_commands.add_parser("list", help="list packs and their versions")
    pack_list.add_argument("--json", action="store_true")
    pack_list.set_defaults(handler=cmd_pack_list)
    pack_show = pack_commands.add_parser("show", help="validate a pack and print its manifest")
    pack_show.add_argument("ref", metavar="NAME[@VERSION]")
    pack_show.set_defaults(handler=cmd_pack_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (CLIError, PackError) as exc:
        print(f"lks: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the model loader and others: one line, not a traceback
        from server.model import ModelLoadError

        if isinstance(exc, ModelLoadError):
            print(f"lks: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
