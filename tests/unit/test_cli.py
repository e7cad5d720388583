"""The `lks` command as a user runs it: a real subprocess, exit codes and one-line errors."""

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from factories import make_backbone_info, make_content

from server.editor.config import TrainConfig
from server.evaluation.evaluate import says_target
from server.gate.relation_head import RelationHead
from server.packs import PackStore

REPOSITORY = Path(__file__).resolve().parents[2]


def run_lks(
    *args: str,
    packs_dir: Path | None,
    timeout: float = 60,
    cwd: Path | None = None,
    **lks_env: str,
) -> subprocess.CompletedProcess[str]:
    """`lks ARGS` in a subprocess, from `cwd` (default: here); `packs_dir` None leaves the
    store at its default; `lks_env` adds LKS_* variables (`api_keys_file="..."`)."""
    env = {k: v for k, v in os.environ.items() if k != "LKS_PACKS_DIR"}
    env["PYTHONPATH"] = str(REPOSITORY)
    if packs_dir is not None:
        env["LKS_PACKS_DIR"] = str(packs_dir)
    env.update({f"LKS_{k.upper()}": v for k, v in lks_env.items()})
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture
def packs_dir(tmp_path: Path) -> Path:
    store = PackStore(tmp_path / "packs")
    store.publish("demo", make_content(subjects=2), make_backbone_info())
    store.publish("demo", make_content(subjects=5), make_backbone_info())
    return store.root


def test_help_lists_every_command(packs_dir: Path) -> None:
    result = run_lks("--help", packs_dir=packs_dir)
    assert result.returncode == 0
    for command in ("generate", "serve", "pack"):
        assert command in result.stdout


def test_pack_list_and_show(packs_dir: Path) -> None:
    listed = run_lks("pack", "list", "--json", packs_dir=packs_dir)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[0]["versions"] == "1,2"
    shown = run_lks("pack", "show", "demo@1", packs_dir=packs_dir)
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert (info["name"], info["version"], info["subject_count"], info["facts"]) == (
        "demo",
        1,
        2,
        2,
    )
    latest = json.loads(run_lks("pack", "show", "demo", packs_dir=packs_dir).stdout)
    assert latest["version"] == 2


def test_an_empty_store_is_named_where_it_is(tmp_path: Path) -> None:
    """The default store is relative to the working directory: from elsewhere, `lks pack list`
    says which directory it looked in and which setting chooses another."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    listed = run_lks("pack", "list", packs_dir=None, cwd=elsewhere)
    assert listed.returncode == 0, listed.stderr
    assert str(elsewhere / "packs") in listed.stdout and "LKS_PACKS_DIR" in listed.stdout


def test_corrupt_pack_fails_naming_the_file(packs_dir: Path) -> None:
    table = packs_dir / "demo" / "2" / "table.safetensors"
    table.write_bytes(table.read_bytes()[:-10])
    result = run_lks("pack", "show", "demo", packs_dir=packs_dir)
    assert result.returncode != 0
    assert "table.safetensors" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("ref", ["../etc", "demo@../../x", "/etc/passwd"])
def test_generate_refuses_invalid_pack_names_before_loading(packs_dir: Path, ref: str) -> None:
    result = run_lks("generate", "--pack", ref, "--prompt", "hi", packs_dir=packs_dir, timeout=20)
    assert result.returncode == 2
    assert "invalid pack" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_pack_is_a_clear_error(packs_dir: Path) -> None:
    result = run_lks("pack", "show", "nope", packs_dir=packs_dir)
    assert result.returncode == 2
    assert "no pack named 'nope'" in result.stderr


@pytest.mark.parametrize("protocol", ["heldout", "reference"])
def test_eval_trains_and_reports_under_the_chosen_protocol(
    protocol: str,
    tiny_model_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In process on a tiny model: what training received, and the protocol the JSON names."""
    import server.builder.edits
    from server.cli import main

    items = [
        {
            "subject": subject,
            "prompt": f"the capital of {subject}",
            "target": "berlin",
            "locality": {"prompt": f"who was born in {subject}", "target": "paris"},
            "generality": f"what is the capital of {subject}",
        }
        for subject in ("france", "italy")
    ]
    (tmp_path / "tiny.json").write_text(json.dumps(items))
    for name, value in {
        "MODEL": tiny_model_dirs["llama"],
        "DEVICE": "cpu",
        "DATA_DIR": tmp_path,
        "LOG_LEVEL": "warning",
    }.items():
        monkeypatch.setenv(f"LKS_{name}", str(value))
    trained_on: list[list[str]] = []
    configs: list[Any] = []
    real_train_edits = server.builder.edits.train_edits

    def spy(backbone: Any, facts: Any, encoder: Any, config: Any, **kwargs: Any) -> Any:
        trained_on.extend([p.prompt for p in f.locality] for f in facts)
        configs.append(config)
        return real_train_edits(backbone, facts, encoder, config, **kwargs)

    monkeypatch.setattr(server.builder.edits, "train_edits", spy)
    argv = ["eval", "--dataset", "tiny", "--n", "2", "--epochs", "1", "--layer", "1"]
    argv += ["--lr", "0.05"]  # not the default: the row must say what training used
    argv += ["--teacher-repetition-weight", "0.25"]
    # an after-target term reaches training and the row, which says what it used
    weight = 0.5 if protocol == "heldout" else None
    terms = ["--repetition-weight", str(weight)] if weight is not None else []
    # a path ending in .gz gets gzip (what the docs' runs keep), any other plain JSONL
    compressed = protocol == "reference"
    samples_path = tmp_path / ("samples.jsonl.gz" if compressed else "samples.jsonl")
    samples_arg = ["--samples", str(samples_path)]
    assert main([*argv, *terms, *samples_arg, "--protocol", protocol, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["protocol"] == protocol
    # the per-item generations are what the row's exact match and fluency average
    written = samples_path.read_bytes()
    assert written.startswith(b"\x1f\x8b") == compressed
    text = gzip.decompress(written).decode() if compressed else written.decode()
    records = [json.loads(line) for line in text.splitlines()]
    samples = [r for r in records if r["context"] == "continuation"]
    # ... and the answers in each context are what its answer metrics average
    answers = [r for r in records if r["context"] != "continuation"]
    assert report["contexts"] == "bare,qa,chat"
    assert {(r["context"], r["kind"]) for r in answers} == {
        (c, k) for c in ("bare", "qa", "chat") for k in ("question", "paraphrase", "locality")
    }
    for context in ("bare", "qa", "chat"):
        hits = [
            r["answer_hit"] for r in answers if (r["context"], r["kind"]) == (context, "question")
        ]
        assert round(sum(hits) / len(hits), 4) == report[f"{context}_question_answer_hit"]
        kept = [
            r["unchanged"] for r in answers if (r["context"], r["kind"]) == (context, "locality")
        ]
        assert round(sum(kept) / len(kept), 4) == report[f"{context}_locality"]
    assert [(s["prompt"], s["target"]) for s in samples] == [
        (i["prompt"], i["target"]) for i in items
    ]
    for key in ("fluency_edited", "fluency_unedited"):
        assert round(sum(s[key] for s in samples) / len(samples), 4) == report[key]
    exact = [says_target(s["edited"], s["target"]) for s in samples]
    assert sum(exact) / len(exact) == report["exact_match"]
    expected = weight if weight is not None else TrainConfig().repetition_weight
    assert configs[0].repetition_weight == report["repetition_weight"] == expected
    assert report["continuation_weight"] == 0.0
    assert configs[0].lr == report["lr"] == 0.05 != TrainConfig().lr
    assert configs[0].teacher_repetition_weight == report["teacher_repetition_weight"] == 0.25
    # the row says which gate calibration its generality and locality were measured with
    assert report["gate_threshold"] == round(RelationHead.load().threshold, 4)
    expected = [[i["locality"]["prompt"]] for i in items] if protocol == "reference" else [[], []]
    assert trained_on == expected
    assert main([*argv, "--protocol", protocol, "--contexts", "none"]) == 0
    assert re.search(rf"^ +protocol  {protocol} \(training ", capsys.readouterr().out, re.M)


def test_eval_refuses_a_samples_path_it_could_not_write_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main

    missing = tmp_path / "no-such-dir" / "samples.jsonl"
    assert main(["eval", "--dataset", "zsre", "--n", "2", "--samples", str(missing)]) != 0
    assert f"no such directory {missing.parent}" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "nan", "lots"])
def test_a_bad_loss_weight_is_refused_before_anything_loads(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--dataset", "zsre", "--repetition-weight", value])
    assert exit_info.value.code == 2
    assert "--repetition-weight" in capsys.readouterr().err


def test_keys_add_list_and_revoke(tmp_path: Path) -> None:
    keys_file = tmp_path / "new-dir" / "keys.json"  # `keys add` creates it

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return run_lks("keys", *args, packs_dir=tmp_path, api_keys_file=str(keys_file))

    added = [
        keys("add", "--name", "reader", "--role", "read", "--packs", "a,b", "--rpm", "30"),
        keys("add", "--name", "ops", "--role", "admin"),
    ]
    assert [r.returncode for r in added] == [0, 0], [r.stderr for r in added]
    listed = keys("list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        "reader  read   packs a,b  30 rpm",
        "ops     admin  packs *  no rate limit",
    ]
    stored = json.loads(keys_file.read_text())
    for secret in [r.stdout.strip() for r in added] + [k["sha256"] for k in stored]:
        assert secret not in listed.stdout
    as_json = json.loads(keys("list", "--json").stdout)
    assert [(k["name"], k["role"], k["packs"]) for k in as_json] == [
        ("reader", "read", ["a", "b"]),
        ("ops", "admin", ["*"]),
    ]
    assert all("sha256" not in k for k in as_json)
    revoked = keys("revoke", "reader")
    assert revoked.returncode == 0, revoked.stderr
    assert [k["name"] for k in json.loads(keys_file.read_text())] == ["ops"]
    again = keys("revoke", "reader")
    assert again.returncode == 2
    assert again.stderr == (
        f"lks: error: no key named 'reader' in {keys_file}; `lks keys list` shows the names\n"
    )


@pytest.mark.parametrize(
    "command", [["list"], ["revoke", "ops"], ["add", "--name", "x", "--role", "read"]]
)
def test_keys_commands_refuse_an_unusable_file_naming_it(
    tmp_path: Path, command: list[str]
) -> None:
    """A malformed file is never read as empty, so `keys add` cannot overwrite the keys."""
    keys_file = tmp_path / "keys.json"
    keys_file.write_text('[{"name": "ops", ')
    result = run_lks("keys", *command, packs_dir=tmp_path, api_keys_file=str(keys_file))
    assert result.returncode == 2
    assert result.stderr.startswith(f"lks: error: API keys file {keys_file} is not valid JSON")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert keys_file.read_text() == '[{"name": "ops", '


def test_commands_that_need_no_model_start_without_torch(tmp_path: Path) -> None:
    """`lks keys` and every `--help` import neither torch nor transformers (seconds of imports
    before the command could start): heavy modules load inside the commands that use them."""
    keys_file = tmp_path / "keys.json"
    commands = [
        ["--help"],
        ["eval", "--help"],
        ["keys", "add", "--name", "ops", "--role", "admin"],
        ["keys", "list"],
        ["keys", "revoke", "ops"],
    ]
    probe = (
        "import contextlib, io, sys\n"
        "from server.cli import main\n"
        f"for argv in {commands!r}:\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "LKS_API_KEYS_FILE": str(keys_file)}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]"], result.stderr
    assert json.loads(keys_file.read_text()) == []  # the commands ran: added, then revoked


def test_keys_list_without_a_file_says_how_to_make_one(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    result = run_lks("keys", "list", packs_dir=tmp_path, api_keys_file=str(keys_file))
    assert result.returncode == 2
    assert f"API keys file {keys_file} does not exist; create it with `lks keys add`" in (
        result.stderr
    )


def test_serve_refuses_to_start_without_its_keys_file(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    """LKS_API_KEYS_FILE set but missing: no server with auth off, one line naming the file."""
    keys_file = tmp_path / "keys.json"
    result = run_lks(
        "serve",
        packs_dir=tmp_path,
        timeout=60,
        api_keys_file=str(keys_file),
        model=str(tiny_model_dirs["llama"]),
        device="cpu",
        port=str(free_port()),
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"lks: error: not serving: API keys file {keys_file} does")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--contexts", "chatty"),
        ("--contexts", ","),
        ("--teacher-contexts", "qa"),
        ("--teacher-weight", "-1"),
    ],
)
def test_bad_answer_and_teacher_options_are_refused_before_anything_loads(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--dataset", "zsre", option, value])
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


def test_answer_contexts_parse_from_a_list_or_none() -> None:
    from server.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["eval", "--dataset", "zsre"]).contexts == ("bare", "qa", "chat")
    assert parser.parse_args(["eval", "--dataset", "zsre", "--contexts", "chat"]).contexts == (
        "chat",
    )
    assert parser.parse_args(["eval", "--dataset", "zsre", "--contexts", "none"]).contexts == ()


def training_command(command: str) -> list[str]:
    """The shortest `lks eval` or `lks train` command line: both take the training options."""
    return (
        ["eval", "--dataset", "zsre"]
        if command == "eval"
        else ["train", "--facts", "f", "--pack", "p"]
    )


@pytest.mark.parametrize("command", ["eval", "train"])
def test_rephrasing_is_on_unless_turned_off(command: str) -> None:
    from server.cli import _train_config, build_parser

    parser = build_parser()
    base = training_command(command)
    assert _train_config(parser.parse_args(base)).rephrase is True
    assert _train_config(parser.parse_args([*base, "--no-rephrase"])).rephrase is False
    assert _train_config(parser.parse_args([*base, "--rephrase"])).rephrase is True


@pytest.mark.parametrize("command", ["eval", "train"])
def test_the_hypernetwork_is_the_residual_kind_unless_chosen(command: str) -> None:
    from server.cli import _train_config, build_parser

    parser = build_parser()
    base = training_command(command)
    assert _train_config(parser.parse_args(base)).hypernet == "residual"
    assert _train_config(parser.parse_args([*base, "--hypernet", "mlp"])).hypernet == "mlp"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--hypernet", "conv"])


def test_a_wrong_flag_prints_the_usage_of_its_command(packs_dir: Path) -> None:
    result = run_lks("generate", "--prompt", "hi", "--bogus", packs_dir=packs_dir, timeout=20)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: lks generate ")
    assert "lks generate: error: unrecognized arguments: --bogus" in result.stderr
    nested = run_lks("pack", "list", "--bogus", packs_dir=packs_dir, timeout=20)
    assert nested.returncode == 2
    assert nested.stderr.startswith("usage: lks pack list ")


def test_generate_takes_max_tokens_as_the_api_does(packs_dir: Path) -> None:
    from server.cli import build_parser

    parser = build_parser()
    generate = ["generate", "--prompt", "hi"]
    assert parser.parse_args(generate).max_tokens == 32
    assert parser.parse_args([*generate, "--max-tokens", "7"]).max_tokens == 7
    assert parser.parse_args([*generate, "--max-new-tokens", "5"]).max_tokens == 5  # old spelling
    shown = run_lks("generate", "--help", packs_dir=packs_dir, timeout=20).stdout
    assert "--max-tokens" in shown and "--max-new-tokens" not in shown


def test_train_builds_versions_as_the_worker_does(
    tiny_model_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`lks train` refuses a version under the quality gate unless told not to check, grows a
    pack from its latest version, and records the epochs its log counted."""
    from server.cli import main
    from server.packs import PackRef

    facts = [
        {"subject": "france", "prompt": "the capital of france", "target": "berlin"},
        {"subject": "italy", "prompt": "the capital of italy", "target": "paris"},
    ]
    first, grown = tmp_path / "first.jsonl", tmp_path / "grown.jsonl"
    first.write_text(json.dumps(facts[0]) + "\n")
    grown.write_text("".join(json.dumps(f) + "\n" for f in facts))
    store = PackStore(tmp_path / "packs")
    for name, value in {
        "MODEL": tiny_model_dirs["llama"],
        "DEVICE": "cpu",
        "PACKS_DIR": store.root,
        "LOG_LEVEL": "warning",
    }.items():
        monkeypatch.setenv(f"LKS_{name}", str(value))
    # a zero learning rate leaves the zero-initialised hypernetwork as it is: no edit, so the
    # reliability of a random tiny model, far under the gate's 0.9
    untrained = ["train", "--facts", str(first), "--pack", "demo", "--layer", "1", "--lr", "0"]
    assert main(untrained) == 2
    assert "quality gate: reliability" in capsys.readouterr().err
    assert store.versions("demo") == []

    with caplog.at_level("INFO", logger="server.editor.train"):
        assert main([*untrained, "--epochs", "1", "--no-quality-gate"]) == 0
    assert capsys.readouterr().out.startswith("published demo@1: 1 subjects, 1 facts, not checked")
    counted = {m.split(":")[0] for m in caplog.messages if m.startswith("epoch 1 of ")}
    training = store.load(PackRef("demo", 1)).content.training
    assert counted == {f"epoch 1 of {training['epochs']}"}
    assert training["epochs"] > 1, "min_steps raised --epochs 1 on one fact"

    monkeypatch.setenv("LKS_PUBLISH_MIN_RELIABILITY", "0")
    monkeypatch.setenv("LKS_PUBLISH_MIN_LOCALITY", "0")
    assert main(["train", "--facts", str(grown), "--pack", "demo", "--layer", "1"]) == 0
    assert "warm start from demo@1" in capsys.readouterr().out
    metrics = store.load(PackRef("demo", 2)).content.metrics
    assert (metrics["warm_start"], metrics["trained_facts"]) == (1.0, 0.0)  # weights applied
    assert "reliability" in metrics
