"""One settings object for the whole server, read from ``LKS_*`` environment variables.

Built once in an entry point (CLI command, app factory) and passed down; nothing else reads the
environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

DeviceChoice = Literal["auto", "cpu", "cuda"]
DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LKS_", extra="ignore")

    model: Path | None = Field(
        default=None,
        description="Local Hugging Face causal-LM directory; unset serves the embedded default.",
    )
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "lks-server",
        description="Where the default model is converted once and cached as safetensors.",
    )
    device: DeviceChoice = "auto"
    dtype: DtypeChoice = Field(
        default="auto",
        description="The serving dtype. auto: bfloat16 on a GPU that has it (else float16), "
        "bfloat16 on a CPU with AVX-512 BF16 or AMX, float32 on other CPUs.",
    )
    train_dtype: Literal["auto", "float32", "mixed", "serving"] = Field(
        default="auto",
        description="What training runs in. float32: a float32 copy of the weights when the "
        "backbone serves in another dtype (loaded by the first training job); mixed: a float32 "
        "copy in any case, its linear layers multiplying in bfloat16 (for CPUs with bfloat16 "
        "instructions); "
        "serving: the served weights (less memory, edits of lower generality); auto: mixed on "
        "a CPU with bfloat16 instructions, float32 on other CPUs, serving on a GPU.",
    )
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        description="Threads each CPU operation uses (unset: torch's default, one per core). "
        "On a machine shared with other work, fewer than its cores keeps every step from "
        "waiting for a thread the system has paused.",
    )
    packs_dir: Path = Field(default=Path("packs"), description="The pack store.")
    data_dir: Path = Field(
        default=Path("../shared/data"), description="Where `lks eval` finds zsre/counterfact."
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_tokens_limit: int = Field(default=2048, ge=1, description="Upper bound on max_tokens.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # serving: the batching engine and the live packs
    max_batch_size: int = Field(default=32, ge=1, description="Rows in one forward pass.")
    max_queued_requests: int = Field(
        default=256, ge=1, description="Queued + running requests before new ones get 503."
    )
    max_batch_tokens: int = Field(
        default=65_536,
        ge=64,
        description="KV budget: rows x the longest row's prompt + max_tokens. A request over "
        "it alone gets 422; others wait for room.",
    )
    prefill_chunk_tokens: int = Field(
        default=256,
        ge=16,
        description="Longer prompts are prefilled this many tokens per step, so running "
        "requests keep decoding meanwhile.",
    )
    slot_kv_cache: bool = Field(
        default=True,
        description="Decode on preallocated per-request KV slots (false: a DynamicCache "
        "re-batched between steps, the slower path kept as a fallback).",
    )
    compile_decode: bool | None = Field(
        default=None,
        description="torch.compile the decode step before serving (readiness says warming "
        "meanwhile): CUDA graphs on CUDA; on a CPU the one-row step, and not at all for "
        "bfloat16 weights packed for oneDNN (they decode as fast eager). Unset: on CUDA only "
        "(7x eager there: docs/results/gpu.md).",
    )

    def compiles_decode_on(self, device: str) -> bool:
        """Whether the decode step compiles on `device` (a torch device type)."""
        return self.compile_decode if self.compile_decode is not None else device == "cuda"

    release_answered_edits: bool = Field(
        default=True,
        description="In a completion (not a chat), the edit of a statement fact steers only "
        "until the answer says its target; the rest is the model's own continuation "
        "(docs/results/natural_edits.md, 2h). Off: every edit steers every token.",
    )
    max_prompt_chars: int = Field(
        default=100_000, ge=1, description="Longest prompt, in characters once rendered."
    )
    max_chat_messages: int = Field(default=512, ge=1, description="Most messages in a chat.")
    max_stop_strings: int = Field(default=8, ge=0, description="Most stop strings.")
    max_stop_chars: int = Field(default=256, ge=1, description="Longest stop string.")
    max_subject_matches: int = Field(
        default=256,
        ge=1,
        description="Most mentions of edited subjects in one prompt (each is an edit to plan).",
    )
    max_packs_per_request: int = Field(default=4, ge=1, le=16)
    request_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="Every generation request ends by then: a result, or 504 (queue time counts).",
    )
    ready_stall_seconds: float = Field(
        default=60.0,
        gt=0,
        description="/readyz answers 503 when work waits and no engine step ended for this long.",
    )
    pack_memory_mb: int = Field(
        default=1024, ge=1, description="Budget for loaded pack versions; LRU beyond it."
    )
    pinned_packs: list[str] = Field(
        default_factory=list, description="Pack names never evicted (JSON list in the env)."
    )
    pack_poll_seconds: float = Field(
        default=0.25, gt=0, description="How often the store is checked for new versions."
    )
    max_pack_mb: int = Field(
        default=2048,
        ge=1,
        description="Largest pack version read from the store (its files together); a larger "
        "or truncated one is refused before it is read, so it cannot exhaust memory.",
    )

    # jobs: submitted facts, training jobs, the worker
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; unset: SQLite at <packs_dir>/.lks-jobs.db (no set-up).",
    )
    worker: bool = Field(default=True, description="`lks serve` runs a training worker too.")
    job_lease_seconds: float = Field(
        default=30.0,
        gt=1,
        description="A dead worker's job is reclaimed after this long without a heartbeat.",
    )
    job_max_attempts: int = Field(
        default=3,
        ge=1,
        description="Attempts (an error, or a worker that died) before a job ends failed.",
    )
    publish_min_reliability: float = Field(default=0.9, ge=0, le=1)
    publish_min_locality: float = Field(default=0.8, ge=0, le=1)
    max_facts_per_request: int = Field(default=1000, ge=1)
    train_cache_mb: int = Field(
        default=4096,
        ge=0,
        description="Training's cached activations beyond this live in a file mapped from disk.",
    )

    # security
    max_body_bytes: int = Field(default=8 << 20, ge=1024, description="Largest request body.")
    api_keys_file: Path | None = Field(
        default=None, description="JSON file of hashed API keys (`lks keys add`); unset: no auth."
    )

    @field_validator("model", "cache_dir", "packs_dir", "data_dir", mode="after")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("model", mode="after")
    @classmethod
    def _model_dir_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / "config.json").is_file():
            raise ValueError(
                f"LKS_MODEL={value} is not a Hugging Face model directory (no config.json there)"
            )
        return value

    @property
    def jobs_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.packs_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.packs_dir.resolve() / '.lks-jobs.db'}"

    @property
    def max_pack_bytes(self) -> int:
        return self.max_pack_mb << 20

    @property
    def model_name(self) -> str:
        return self.model.name if self.model is not None else DEFAULT_MODEL_NAME
