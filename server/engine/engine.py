"""The batching engine: one resident backbone, many requests, one forward pass per step.

Requests arrive prepared (`prepare.py`: token ids and an edit plan). Each `step` admits the
waiting requests that fit the row and token budgets (one batched, left-padded prefill that
carries their edit plans; a prompt longer than a prefill chunk is prefilled one chunk per step,
so the running rows keep decoding meanwhile), then runs one decode step for every running
request, whatever pack it uses. Requests join and leave between steps (continuous batching); an
edit touches only the prefill of its own row, and the KV cache carries it into decoding.
In a completion, an edit of a statement fact steers until its answer is said: once a row's text
says one of the edit's release targets (`edit_set.release_targets`), the row leaves the batch and
joins again, its prompt and answer so far re-read without that edit (one more prefill), so what
follows is the model's own continuation rather than the edited subject's state read at every
later position (which loops: "Rome Rome"). Training teaches every other answer its end.
Decoding runs on a slot KV cache (`slot_cache.py`: each row keeps its own preallocated columns;
the step may be compiled); a model it cannot serve decodes on a `DynamicCache` re-batched
between steps (`server/model/kv_cache.py`). The engine is single-threaded by design: the
scheduler owns the thread that calls `step`.

Faults stay with the request they belong to: a request whose admission, sampling or text fails
gets `Failed` and the other rows go on; a batched prefill that fails is retried one row at a
time, so only the row that cannot run fails; a decode step that fails fails the rows in it and
the next step starts clean. Every request carries a deadline, checked before each step.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache

from server.editor.answers import MAX_RELEASES, target_said
from server.engine.detokenize import (
    REPLACEMENT,
    IncrementalDetokenizer,
    first_stop,
    stop_prefix_at_end,
)
from server.engine.prepare import PreparedPrompt, PromptRejected, RequestLimits, prepare_prompt
from server.engine.sampling import RowSamplingError, SamplingParams, make_rng, sample_rows
from server.engine.slot_cache import SlotDecoder, unsupported_reason
from server.model import kv_cache
from server.model.backbone import Backbone
from server.model.hook import EditPlan
from server.packs.edit_set import EditSet, PlannedEdit

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "abort"]
FailureKind = Literal["error", "timeout", "overloaded"]


@dataclass(frozen=True)
class Generation:
    """What one request produced."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: FinishReason
    edits_applied: list[str] = field(default_factory=list)
    edits_released: list[str] = field(default_factory=list)  # once their answer was said

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Admitted:
    """First event of every request: its prompt was prefilled with these edits."""

    prompt_tokens: int
    edits_applied: list[str]


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    generation: Generation


@dataclass(frozen=True)
class Failed:
    """The request cannot complete; the others are unaffected. `kind` says whose fault it is:
    `error` (this request's input or its forward pass), `timeout` (its deadline passed) or
    `overloaded` (no memory for it now; retrying later may work). `error` is safe to show a
    client: details stay in the server log."""

    error: str
    kind: FailureKind = "error"


@dataclass(frozen=True)
class Rejected:
    """The request cannot run as asked (its prompt does not fit); nothing was generated."""

    message: str
    param: str


EngineEvent = Admitted | TextDelta | Finished | Failed | Rejected
EventSink = Callable[[EngineEvent], None]


@dataclass
class EngineRequest:
    """A request as the engine sees it: text exactly as the model reads it, resolved packs, and
    (from the server) the prepared prompt.

    The packs are passed with the request (not looked up by name at run time), so a pack
    swapped while the request waits or runs never changes what it gets. A request without
    `prompt` (in-process callers: the CLI, evaluation, tests) is prepared when it is added.
    """

    text: str
    params: SamplingParams
    templated: bool = False  # a rendered chat template: it already holds its special tokens
    edit_sets: Sequence[EditSet] = ()
    sink: EventSink | None = None
    prompt: PreparedPrompt | None = None
    deadline: float | None = None  # time.monotonic() by which the request must have ended
    request_id: int = field(default_factory=itertools.count().__next__)
    ended: bool = field(default=False, init=False, repr=False)

    def send(self, event: EngineEvent) -> None:
        """Deliver an event. A request gets exactly one last event (Finished, Failed or
        Rejected): later ones are dropped. A sink that raises (its client's loop closed) hurts
        no one else."""
        if self.ended:
            return
        self.ended = isinstance(event, Finished | Failed | Rejected)
        if self.sink is None:
            return
        try:
            self.sink(event)
        except Exception:
            log.exception("request %d: delivering %s failed", self.request_id, type(event).__name__)


@dataclass
class _Running:
    request: EngineRequest
    prompt_ids: list[int]
    edits: list[PlannedEdit]  # every edit its prompt got (the audit trail)
    rng: torch.Generator | None
    detokenizer: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: str = ""
    finish: FinishReason | None = None
    steering: list[PlannedEdit] = field(init=False)  # the edits its next prefill carries
    rejoin: bool = False  # an edit was released: re-read the context without it
    released: list[str] = field(default_factory=list)  # labels of the released edits
    rejoins: int = 0

    def __post_init__(self) -> None:
        self.steering = list(self.edits)

    @property
    def context_ids(self) -> list[int]:
        """What a prefill of this row reads: its prompt, and (a row that rejoins) its answer
        so far, the last sampled token included."""
        return self.prompt_ids + self.output_ids

    def emit(self, event: EngineEvent) -> None:
        self.request.send(event)

    def fail(self, failure: Failed) -> None:
        """End the row with `failure` (a no-op for a row that has had its last event)."""
        self.finish = self.finish or "abort"
        self.emit(failure)


@dataclass
class _Prefill:
    """Rows being prefilled together, left-padded to one width, `done` columns so far."""

    rows: list[_Running]
    input_ids: torch.Tensor  # [B, W]
    mask: torch.Tensor  # [B, W]
    positions: torch.Tensor  # [B, W]
    edits: list[tuple[int, int, int, torch.Tensor]]  # (layer, row, padded position, delta)
    cache: DynamicCache
    done: int = 0

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class _Batch:
    """The running rows, the sampled tokens not yet fed back, and where their KV cache is: a
    `DynamicCache` with its mask, or (the slot path) one slot per row."""

    rows: list[_Running]
    cache: DynamicCache | None
    mask: torch.Tensor | None  # [B, T] 1 where a cache column is a real token of that row
    next_tokens: torch.Tensor  # [B]
    positions: torch.Tensor  # [B] position id of next_tokens (the slot path: its column too)
    slots: list[int] = field(default_factory=list)  # the slot path: each row's slot
    lengths: list[int] = field(default_factory=list)  # the slot path: positions, on the host


class BatchEngine:
    def __init__(
        self,
        backbone: Backbone,
        *,
        max_batch_size: int = 32,
        max_batch_tokens: int | None = None,
        prefill_chunk_tokens: int | None = None,
        on_step: Callable[[int], None] | None = None,
        slot_cache: bool = True,
        compile_decode: bool = False,
        release_answered_edits: bool = True,
    ) -> None:
        """`max_batch_tokens` bounds the KV cache: rows x the longest row's prompt + max_tokens;
        None: rows alone. `prefill_chunk_tokens`: prompts longer than this are prefilled one
        chunk per step; None: in one pass. `slot_cache`: decode on the slot KV cache where the
        model allows (else on a re-batched `DynamicCache`); `compile_decode`: compile its step.
        `release_answered_edits`: in a completion (not a chat), an edit whose pack gave it
        release targets steers only until the answer says one."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk_tokens is not None and prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {prefill_chunk_tokens}")
        self.backbone = backbone
        self.on_step = on_step  # told the rows of every decode step (metrics)
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.release_answered_edits = release_answered_edits
        self.waiting: deque[EngineRequest] = deque()
        self._batch: _Batch | None = None
        self._prefilling: _Prefill | None = None  # a long prompt, one chunk per step
        self._rejoining: list[_Running] = []  # rows that released an edit, to prefill again
        self._eos = set(backbone.eos_token_ids)
        self._slots: SlotDecoder | None = None
        if slot_cache:
            reason = unsupported_reason(backbone.model)
            if reason is None:
                self._slots = SlotDecoder(backbone.model, max_batch_size, compile=compile_decode)
            else:
                log.warning("decoding on a DynamicCache: the slot KV cache cannot serve %s", reason)

    # -- queue -------------------------------------------------------------------------------

    def add(self, request: EngineRequest) -> None:
        """Queue a request; one without a prepared prompt is prepared here (in-process
        callers), and one that cannot run gets `Rejected` at once."""
        if request.prompt is None:
            try:
                request.prompt = prepare_prompt(
                    self.backbone,
                    request.text,
                    request.params,
                    templated=request.templated,
                    edit_sets=request.edit_sets,
                    limits=RequestLimits(max_request_tokens=self.max_batch_tokens),
                )
            except PromptRejected as exc:
                request.send(Rejected(exc.message, exc.param))
                return
            except Exception:
                log.exception("request %d: preparing it failed", request.request_id)
                request.send(Failed("the request could not be prepared"))
                return
        self.waiting.append(request)

    def abort(self, request_id: int) -> bool:
        """Stop a request (a client went away); True if it was still queued or running."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                request.send(Finished(Generation("", [], 0, "abort")))
                return True
        for row in self._rows():
            if row.request.request_id == request_id and row.finish is None:
                row.finish = "abort"
                return True
        return False

    def _rows(self) -> list[_Running]:
        """Every admitted row: running, being prefilled, and waiting to rejoin."""
        running = self._batch.rows if self._batch is not None else []
        prefilling = self._prefilling.rows if self._prefilling is not None else []
        return running + prefilling + self._rejoining

    def fail_all(self, failure: Failed) -> None:
        """Tell every queued and running request that it failed, then forget them all."""
        waiting = list(self.waiting)
        self.waiting.clear()
        for request in waiting:
            request.send(failure)
        self.fail_running(failure)

    @property
    def running(self) -> int:
        return len(self._batch.rows) if self._batch is not None else 0

    def has_work(self) -> bool:
        return (
            bool(self.waiting)
            or self._batch is not None
            or self._prefilling is not None
            or bool(self._rejoining)
        )

    # -- stepping ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Admit what fits, advance a long prefill by one chunk, then one decode step for every
        running row. A step that fails fails the requests in it (never the queued ones) and
        leaves the engine ready for the next."""
        self._expire(time.monotonic())
        admitted: list[_Running] = []
        rejoining: list[_Running] = []
        try:
            self._drop_finished()
            if self._prefilling is None:  # a long rejoining row first: it is already serving
                self._prefilling = self._take_long_rejoin()
            admitted = self._admit()
            rejoining = [row for row in self._rejoining if not self._long_context(row)]
            self._rejoining = [row for row in self._rejoining if self._long_context(row)]
            short = [row for row in admitted if not self._long(row.request)]
            if rejoining or short:
                self._prefill_and_join(rejoining + short)
            if self._prefilling is None and len(short) < len(admitted):
                self._prefilling = self._start_prefill(admitted[-1:])
            if self._prefilling is not None:
                self._prefill_chunk()
            self._drop_finished()
            if self._batch is not None:
                self._decode()
                self._drop_finished()
        except Exception as exc:
            log.exception("an engine step failed; its requests fail, the engine goes on")
            failure = step_failure(exc, "this batch")
            for row in rejoining + admitted:
                row.fail(failure)
            self.fail_running(failure)

    def fail_running(self, failure: Failed) -> None:
        """End every admitted row with `failure`: the batch and any prefill are dropped."""
        rows = self._rows()
        self._batch = self._prefilling = None
        self._rejoining = []
        for row in rows:
            row.fail(failure)

    def _expire(self, now: float) -> None:
        """Fail every request whose deadline has passed, queued or running."""
        late = [r for r in self.waiting if r.deadline is not None and r.deadline <= now]
        for request in late:
            self.waiting.remove(request)
            request.send(TIMED_OUT)
        for row in self._rows():
            if row.request.deadline is not None and row.request.deadline <= now:
                row.fail(TIMED_OUT)

    def _admit(self) -> list[_Running]:
        """Take the waiting requests that fit, in order: rows under `max_batch_size`, the
        padded batch under `max_batch_tokens`, and at most one prompt that needs chunking
        (it goes last; a later request waits behind it only for rows or tokens)."""
        rows = self._rows()
        admitted: list[_Running] = []
        widest = max((self._span(r.request) for r in rows), default=0)
        chunking = self._prefilling is not None
        while self.waiting and len(rows) + len(admitted) < self.max_batch_size:
            request = self.waiting[0]
            span = self._span(request)
            cost = (len(rows) + len(admitted) + 1) * max(widest, span)
            if self.max_batch_tokens is not None and cost > self.max_batch_tokens:
                break
            long = self._long(request)
            if long and chunking:
                break
            self.waiting.popleft()
            admitted.append(self._row(request))
            widest = max(widest, span)
            if long:
                break
        return admitted

    @staticmethod
    def _span(request: EngineRequest) -> int:
        """The columns a request can fill: its prompt plus max_tokens."""
        assert request.prompt is not None
        return len(request.prompt.token_ids) + request.params.max_tokens

    def _long_context(self, row: _Running) -> bool:
        """A rejoining row whose prompt and answer so far need a chunked prefill."""
        chunk = self.prefill_chunk_tokens
        return chunk is not None and len(row.context_ids) > chunk

    def _take_long_rejoin(self) -> _Prefill | None:
        """The first long rejoining row, as the chunked prefill (None: there is none)."""
        for index, row in enumerate(self._rejoining):
            if self._long_context(row):
                del self._rejoining[index]
                return self._start_prefill([row])
        return None

    def _long(self, request: EngineRequest) -> bool:
        assert request.prompt is not None
        chunk = self.prefill_chunk_tokens
        return chunk is not None and len(request.prompt.token_ids) > chunk

    def _row(self, request: EngineRequest) -> _Running:
        assert request.prompt is not None
        prompt = request.prompt
        row = _Running(
            request,
            prompt.token_ids,
            prompt.edits,
            make_rng(request.params, self.backbone.device),
            IncrementalDetokenizer(self.backbone.tokenizer),
        )
        row.emit(Admitted(len(prompt.token_ids), [e.label for e in prompt.edits]))
        return row

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    @property
    def slot_decoder(self) -> SlotDecoder | None:
        """The slot-cache decode step; None where this model decodes through a DynamicCache."""
        return self._slots

    @property
    def compiles_decode(self) -> bool:
        """Whether the decode step is compiled (and so wants `warm_up` before serving)."""
        return self._slots is not None and self._slots.compiled

    def warm_up(self) -> float:
        """Compile the decode step's graphs (one row, and several rows where those run compiled)
        on throwaway requests, so that no user request waits for the compiler; the seconds it
        took (0: nothing to compile). Run before serving."""
        if not self.compiles_decode:
            return 0.0
        assert self._slots is not None
        started = time.perf_counter()

        def throwaway() -> EngineRequest:
            params = SamplingParams(max_tokens=3, ignore_eos=True)
            return EngineRequest("", params, prompt=PreparedPrompt([0] * 4, []))

        on_step, self.on_step = self.on_step, None  # throwaway steps are not served traffic
        try:
            self.generate([throwaway()])
            if min(self.max_batch_size, self._slots.compiled_rows) > 1:
                self.generate([throwaway(), throwaway()])
        finally:
            self.on_step = on_step
        return time.perf_counter() - started

    def generate(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        """Run `requests` to completion on the calling thread (CLI, tests, evaluation)."""
        results: dict[int, Generation] = {}
        rejected: list[str] = []
        for request in requests:
            outer = request.sink

            def sink(event: EngineEvent, rid: int = request.request_id, outer=outer) -> None:
                if isinstance(event, Finished):
                    results[rid] = event.generation
                if isinstance(event, Rejected):
                    rejected.append(event.message)
                if outer is not None:
                    outer(event)

            request.sink = sink
            self.add(request)
        self.run_until_done()
        if rejected:
            raise ValueError("; ".join(rejected))
        return [results[r.request_id] for r in requests]

    # -- internals ---------------------------------------------------------------------------

    def _prefill_and_join(self, rows: list[_Running]) -> None:
        """Prefill `rows` as one batch; if that fails, one row at a time, so that only a row
        that cannot run (its pack's table, its memory) fails."""
        try:
            incoming = self._prefill(rows)
        except Exception as exc:
            if len(rows) == 1:
                log.exception("request %d: prefill failed", rows[0].request.request_id)
                rows[0].fail(step_failure(exc, "its prefill"))
                return
            log.warning(
                "a batched prefill of %d rows failed (%s); one row at a time", len(rows), exc
            )
            for row in rows:
                self._prefill_and_join([row])
            return
        self._join(incoming)

    def _start_prefill(self, rows: list[_Running]) -> _Prefill:
        """Left-pad `rows` to one width and lay out their edits; nothing runs yet."""
        backbone = self.backbone
        device = backbone.device
        width = max(len(r.context_ids) for r in rows)
        pad_id = backbone.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        edits: list[tuple[int, int, int, torch.Tensor]] = []
        for i, row in enumerate(rows):
            context = row.context_ids
            pad = width - len(context)
            input_ids[i, pad:] = torch.tensor(context)
            mask[i, pad:] = 1
            edits += [(e.layer, i, pad + e.position, e.delta) for e in row.steering]
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return _Prefill(
            rows,
            input_ids.to(device),
            mask.to(device),
            positions.to(device),
            edits,
            DynamicCache(config=backbone.model.config),
        )

    def _prefill(self, rows: list[_Running]) -> _Batch:
        """All of `rows`' prompts in one pass."""
        prefill = self._start_prefill(rows)
        batch = self._run_prefill(prefill, prefill.width)
        assert batch is not None
        return batch

    def _prefill_chunk(self) -> None:
        """The next chunk of the long prefill; its rows join the batch after the last one."""
        prefill = self._prefilling
        assert prefill is not None and self.prefill_chunk_tokens is not None
        try:
            upto = min(prefill.done + self.prefill_chunk_tokens, prefill.width)
            batch = self._run_prefill(prefill, upto)
        except Exception as exc:
            log.exception("a chunked prefill of %d rows failed", len(prefill.rows))
            self._prefilling = None
            for row in prefill.rows:
                row.fail(step_failure(exc, "its prefill"))
            return
        if batch is not None:
            self._prefilling = None
            self._join(batch)

    def _run_prefill(self, prefill: _Prefill, upto: int) -> _Batch | None:
        """Columns done..upto of `prefill`, with the edits whose positions fall there; after
        the last column, the first sampled tokens and the rows as a batch."""
        backbone = self.backbone
        start = prefill.done
        plan: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
        for layer, row, position, delta in prefill.edits:
            if start <= position < upto:
                plan.setdefault(layer, []).append((row, position - start, delta))
        with ExitStack() as stack:
            for layer, edits in plan.items():
                built = EditPlan.build(
                    edits, hidden_size=backbone.hidden_size, device=backbone.device
                )
                stack.enter_context(backbone.edit_hooks.at(layer).plan(built))
            out = backbone.model(
                input_ids=prefill.input_ids[:, start:upto],
                attention_mask=prefill.mask[:, :upto],
                position_ids=prefill.positions[:, start:upto],
                cache=prefill.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        prefill.done = upto
        if upto < prefill.width:
            return None
        rows = prefill.rows
        lengths = [len(r.context_ids) for r in rows]  # before sampling appends a token
        positions = torch.tensor(lengths, device=backbone.device)
        tokens = self._sample(rows, out.logits[:, -1])  # last: nothing after it can fail
        return _Batch(rows, out.cache, prefill.mask, tokens, positions, lengths=lengths)

    def _decode(self) -> None:
        batch = self._batch
        assert batch is not None
        if self._slots is not None:
            logits = self._slots.step(batch.next_tokens, batch.slots, batch.lengths)
            batch.lengths = [n + 1 for n in batch.lengths]
            batch.positions = batch.positions + 1
            if self.on_step is not None:
                self.on_step(len(batch.rows))
            batch.next_tokens = self._sample(batch.rows, logits)
            return
        assert batch.cache is not None and batch.mask is not None
        mask = torch.cat([batch.mask, batch.mask.new_ones(batch.mask.shape[0], 1)], dim=1)
        out = self.backbone.model(
            input_ids=batch.next_tokens[:, None],
            attention_mask=mask,
            position_ids=batch.positions[:, None],
            cache=batch.cache,
            use_cache=True,
        )
        batch.mask = mask
        batch.positions = batch.positions + 1
        if self.on_step is not None:
            self.on_step(len(batch.rows))
        batch.next_tokens = self._sample(batch.rows, out.logits[:, -1])

    def _sample(self, rows: list[_Running], logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row; a row whose sampling or text fails fails alone (it
        keeps a placeholder token until it leaves the batch)."""
        sampled = sample_rows(logits, [r.request.params for r in rows], [r.rng for r in rows])
        tokens: list[int] = []
        for row, token in zip(rows, sampled, strict=True):
            if isinstance(token, RowSamplingError):
                log.error("request %d: %s", row.request.request_id, token)
                row.fail(Failed(f"sampling failed: {token}"))
                token = self.backbone.tokenizer.pad_token_id
            else:
                try:
                    self._append(row, token)
                except Exception:
                    log.exception(
                        "request %d: handling token %d failed", row.request.request_id, token
                    )
                    row.fail(Failed("turning the generated tokens into text failed"))
            tokens.append(token)
        return torch.tensor(tokens, dtype=torch.long, device=logits.device)

    def _append(self, row: _Running, token: int) -> None:
        if row.finish is not None:
            return  # aborted between steps
        params = row.request.params
        if token in self._eos and not params.ignore_eos:
            row.finish = "stop"
            row.text += row.detokenizer.flush()
        else:
            row.output_ids.append(token)
            new = row.detokenizer.push(token)
            row.text += new
            cut = first_stop(row.text, params.stop, len(new)) if new and params.stop else -1
            if cut >= 0:
                row.text, row.finish = row.text[:cut], "stop"
            elif len(row.output_ids) >= params.max_tokens:
                row.finish = "length"
                row.text += row.detokenizer.flush()
            elif new and self.release_answered_edits and not row.request.templated:
                self._release_answered(row, len(row.text) - len(new))
        self._stream(row)

    @staticmethod
    def _release_answered(row: _Running, since: int) -> None:
        """Release the row's edits whose subject's target its text now says (in the text
        after `since`, or ending there); the row then rejoins without them. A row rejoins at
        most `MAX_RELEASES` times (each is a prefill of its context): the last releases all."""
        steering = [
            e for e in row.steering if not e.targets or not target_said(row.text, e.targets, since)
        ]
        if len(steering) < len(row.steering):
            row.rejoins += 1
            if row.rejoins >= MAX_RELEASES:
                steering = []
            kept = {id(e) for e in steering}
            released = [e.label for e in row.steering if id(e) not in kept]
            log.debug("request %d: released %s", row.request.request_id, released)
            row.released += [label for label in released if label not in row.released]
            row.steering, row.rejoin = steering, True

    def _stream(self, row: _Running) -> None:
        """Send the text that can no longer change: hold back a cut character and any tail
        that may yet become a stop string."""
        ready = row.text
        if row.finish is None:
            ready = ready.rstrip(REPLACEMENT)
            for stop in row.request.params.stop:
                ready = ready[: len(ready) - stop_prefix_at_end(ready, stop)]
        if ready.startswith(row.emitted) and len(ready) > len(row.emitted):
            row.emit(TextDelta(ready[len(row.emitted) :]))
            row.emitted = ready
        if row.finish is not None:
            row.emit(Finished(self._generation(row)))

    def _generation(self, row: _Running) -> Generation:
        return Generation(
            text=row.text,
            token_ids=list(row.output_ids),
            prompt_tokens=len(row.prompt_ids),
            finish_reason=row.finish or "abort",
            edits_applied=[e.label for e in row.edits],
            edits_released=list(row.released),
        )

    def _join(self, incoming: _Batch) -> None:
        if self._slots is not None:
            self._into_slots(incoming)
        batch = self._batch
        if batch is None:
            self._batch = incoming
            return
        if self._slots is not None:
            batch.slots += incoming.slots
            batch.lengths += incoming.lengths
        else:
            assert batch.cache is not None and batch.mask is not None
            assert incoming.cache is not None and incoming.mask is not None
            batch.mask = kv_cache.concat_rows(
                batch.cache, batch.mask, incoming.cache, incoming.mask
            )
        batch.rows += incoming.rows
        batch.next_tokens = torch.cat([batch.next_tokens, incoming.next_tokens])
        batch.positions = torch.cat([batch.positions, incoming.positions])

    def _into_slots(self, incoming: _Batch) -> None:
        """Give each prefilled row a free slot and copy its prompt's keys and values there once;
        the running rows' slots are not touched."""
        decoder = self._slots
        assert decoder is not None and incoming.cache is not None
        batch = self._batch
        occupied = dict(zip(batch.slots, batch.lengths, strict=True)) if batch else {}
        free = (slot for slot in range(decoder.slots) if slot not in occupied)
        lengths = incoming.lengths
        slots = [next(free) for _ in incoming.rows]
        spans = [self._span(row.request) for row in incoming.rows]
        decoder.reserve(incoming.cache, max(spans), occupied)
        decoder.join(incoming.cache, list(zip(slots, range(len(slots)), lengths, strict=True)))
        incoming.cache = incoming.mask = None
        incoming.slots, incoming.lengths = slots, lengths

    def _drop_finished(self) -> None:
        """Rows that ended leave (an aborted one is told it finished); rows that released an
        edit leave to rejoin."""
        for row in self._rejoining:
            if row.finish == "abort":
                row.emit(Finished(self._generation(row)))
        self._rejoining = [row for row in self._rejoining if row.finish is None]
        prefill = self._prefilling
        if prefill is not None and all(row.finish is not None for row in prefill.rows):
            self._prefilling = None  # aborted or failed while prefilling: stop the work
            for row in prefill.rows:
                if row.finish == "abort":
                    row.emit(Finished(self._generation(row)))
        batch = self._batch
        if batch is None:
            return
        for row in batch.rows:
            if row.finish == "abort":  # a no-op for a row that failed
                row.emit(Finished(self._generation(row)))
        keep = [i for i, row in enumerate(batch.rows) if row.finish is None and not row.rejoin]
        for row in batch.rows:
            if row.rejoin and row.finish is None:
                row.rejoin = False
                self._rejoining.append(row)
        if not keep:
            self._batch = None
            return
        if len(keep) == len(batch.rows):
            return
        index = torch.tensor(keep, device=batch.next_tokens.device)
        if batch.cache is not None and batch.mask is not None:
            batch.mask = kv_cache.keep_rows(batch.cache, batch.mask, index)
        else:  # the slot path: the leaving rows' slots are free again, nothing moves
            batch.slots = [batch.slots[i] for i in keep]
            batch.lengths = [batch.lengths[i] for i in keep]
        batch.rows = [batch.rows[i] for i in keep]
        batch.next_tokens = batch.next_tokens[index]
        batch.positions = batch.positions[index]


TIMED_OUT = Failed(
    "the request did not finish within its deadline (LKS_REQUEST_TIMEOUT_SECONDS)", "timeout"
)


def out_of_memory(exc: BaseException) -> bool:
    """Torch's out-of-memory error on an accelerator, or the CPU allocator's refusal."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def step_failure(exc: BaseException, stage: str) -> Failed:
    """What a client is told when a forward pass fails: the kind, never the internals."""
    if out_of_memory(exc):
        return Failed(
            f"out of memory in {stage}; retry later or send a shorter prompt", "overloaded"
        )
    return Failed(f"the model failed in {stage} ({type(exc).__name__}); the server log has details")
