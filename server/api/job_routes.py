"""Edit submission and jobs: POST facts (202 + a job), follow the job, page through facts.

A key sees only the jobs of packs its allow-list names: another pack's job answers 404, as a
missing one does, so job ids do not reveal which packs exist."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from server.api.auth import Caller
from server.api.errors import APIError, redact_paths
from server.api.state import CallerDep, JobStoreDep, StateDep, get_caller
from server.editor.facts import collect_facts
from server.jobs.store import (
    IdempotencyKeyReusedError,
    Job,
    JobStore,
    NotFoundError,
    StoredFact,
)
from server.packs.names import validate_name

router = APIRouter(prefix="/v1", tags=["jobs"], dependencies=[Depends(get_caller)])
RowId = Annotated[int, Path(ge=1, le=2**31 - 1, description="A database row id.")]


def public(job: Job) -> Job:
    """The job as a client sees it: the worker's exception text may name server files."""
    if job.error is None:
        return job
    return job.model_copy(update={"error": redact_paths(job.error)})


class Submitted(BaseModel):
    pack: str
    job_id: int
    fact_ids: list[int]
    job_url: str


class FactOut(BaseModel):
    id: int
    subject: str
    prompt: str
    target: str
    extra: dict[str, Any]
    job_id: int
    created_at: datetime
    live: bool  # the pack's latest published version applies it
    deleting: bool  # deleted; applied until a version without it is published

    @classmethod
    def of(cls, stored: StoredFact) -> FactOut:
        fact = stored.fact
        extra = fact.model_dump(exclude={"subject", "prompt", "target"}, exclude_defaults=True)
        return cls(
            id=stored.id,
            subject=fact.subject,
            prompt=fact.prompt,
            target=fact.target,
            extra=extra,
            job_id=stored.job_id,
            created_at=stored.created_at,
            live=stored.live,
            deleting=stored.deleting,
        )


class FactPage(BaseModel):
    pack: str
    facts: list[FactOut]
    total: int
    offset: int
    limit: int


@router.post("/packs/{name}/facts", status_code=202, response_model=Submitted)
async def submit_facts(
    name: str,
    store: JobStoreDep,
    state: StateDep,
    caller: CallerDep,
    body: Annotated[Any, Body(description='A fact, a list of facts, or {"facts": [...]}')],
    replace: bool = Query(default=False, description="Supersede stored facts that conflict."),
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    """Store facts and queue the job that trains the pack's next version (202: accepted)."""
    caller.require("write", [validate_name(name)])
    records = body.get("facts") if isinstance(body, dict) and "facts" in body else body
    records = records if isinstance(records, list) else [records]
    limit = state.settings.max_facts_per_request
    if not records or len(records) > limit:
        raise APIError(
            422, f"submit 1 to {limit} facts per request, got {len(records)}", param="facts"
        )
    parsed = collect_facts(enumerate(records))
    problems = [*parsed.errors, *parsed.conflicts]
    if problems:
        detail = "; ".join(str(p).replace("line ", "fact ", 1) for p in problems[:20])
        raise APIError(422, f"{len(problems)} bad fact(s): {detail}", param="facts")
    try:
        submission = await _in_thread(
            store.submit, name, parsed.facts, idempotency_key, replace=replace
        )
    except IdempotencyKeyReusedError as exc:
        raise APIError(422, str(exc), param="Idempotency-Key") from exc
    url = f"/v1/jobs/{submission.job_id}"
    content = Submitted(
        pack=name, job_id=submission.job_id, fact_ids=submission.fact_ids, job_url=url
    )
    return JSONResponse(content.model_dump(), status_code=202, headers={"Location": url})


@router.get("/packs/{name}/facts", response_model=FactPage)
async def list_facts(
    name: str,
    store: JobStoreDep,
    caller: CallerDep,
    offset: int = Query(default=0, ge=0, le=2**31 - 1, description="Facts to skip."),
    limit: int = Query(default=100, ge=1, le=1000),
) -> FactPage:
    caller.require("read", [validate_name(name)])
    facts, total = await _in_thread(store.facts, name, offset=offset, limit=limit)
    return FactPage(
        pack=name, facts=[FactOut.of(f) for f in facts], total=total, offset=offset, limit=limit
    )


@router.delete("/packs/{name}/facts/{fact_id}", status_code=202)
async def delete_fact(
    name: str, fact_id: RowId, store: JobStoreDep, caller: CallerDep
) -> dict[str, Any]:
    """Drop a fact; the queued job trains the next version without it. The fact is listed
    (`deleting`) and its edit applied until that version is published; deleting it again after
    a failed retrain queues another."""
    caller.require("write", [validate_name(name)])
    job_id = await _in_thread(store.delete_fact, validate_name(name), fact_id)
    return {
        "pack": name,
        "deleted_fact_id": fact_id,
        "job_id": job_id,
        "job_url": f"/v1/jobs/{job_id}",
    }


@router.get("/jobs", response_model=list[Job])
async def list_jobs(
    store: JobStoreDep,
    caller: CallerDep,
    pack: str | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
) -> list[Job]:
    """The newest jobs of every pack the key allows (admin), or of one pack (a write key
    allowed that pack)."""
    if pack is not None:
        caller.require("write", [validate_name(pack)])
        jobs = await _in_thread(store.jobs, pack=pack, limit=limit)
    else:
        caller.require("admin")
        jobs = await _in_thread(_jobs_in_scope, store, caller.pack_scope, limit)
    return [public(j) for j in jobs]


def _jobs_in_scope(store: JobStore, packs: list[str] | None, limit: int) -> list[Job]:
    """The newest `limit` jobs of `packs` (None: of every pack); one query per pack, since an
    allow-list is a handful of names."""
    if packs is None:
        return store.jobs(limit=limit)
    jobs = [job for pack in packs for job in store.jobs(pack=pack, limit=limit)]
    return sorted(jobs, key=lambda job: job.id, reverse=True)[:limit]


async def _visible_job(store: JobStore, caller: Caller, job_id: int) -> Job:
    """The job, if the caller may follow it: role first (before the database is asked), then
    its pack, which only the database knows; another pack's job is "no job", as in the store."""
    caller.require("write")
    job: Job = await _in_thread(store.job, job_id)
    if not caller.allows(job.pack):
        raise NotFoundError(f"no job {job_id}")
    return job


@router.get("/jobs/{job_id}", response_model=Job)
async def show_job(job_id: RowId, store: JobStoreDep, caller: CallerDep) -> Job:
    return public(await _visible_job(store, caller, job_id))


@router.post("/jobs/{job_id}:cancel", response_model=Job)
async def cancel_job(job_id: RowId, store: JobStoreDep, caller: CallerDep) -> Job:
    """A queued job stops at once; a running one at its next heartbeat (a few seconds)."""
    await _visible_job(store, caller, job_id)
    return public(await _in_thread(store.cancel, job_id))


async def _in_thread(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Database calls block: keep them off the event loop."""
    return await asyncio.to_thread(function, *args, **kwargs)
