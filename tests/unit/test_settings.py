from pathlib import Path

import pytest
from pydantic import ValidationError

from server.settings import DEFAULT_MODEL_NAME, Settings


def test_reads_lks_env_vars(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LKS_PORT", "9123")
    monkeypatch.setenv("LKS_PACKS_DIR", str(tmp_path))
    monkeypatch.setenv("LKS_DTYPE", "bfloat16")
    settings = Settings()
    assert settings.port == 9123
    assert settings.packs_dir == tmp_path
    assert settings.dtype == "bfloat16"
    assert settings.model_name == DEFAULT_MODEL_NAME


def test_model_must_be_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"no config\.json"):
        Settings(model=tmp_path)


def test_model_name_is_the_directory_name(tiny_model_dirs: dict[str, Path]) -> None:
    assert Settings(model=tiny_model_dirs["gpt2"]).model_name == "gpt2"


@pytest.mark.parametrize(("field", "value"), [("port", 0), ("dtype", "int8"), ("device", "tpu")])
def test_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_the_decode_step_compiles_on_cuda_unless_told() -> None:
    assert Settings().compiles_decode_on("cuda") and not Settings().compiles_decode_on("cpu")
    assert not Settings(compile_decode=False).compiles_decode_on("cuda")
    assert Settings(compile_decode=True).compiles_decode_on("cpu")
