"""One error envelope for every 4xx/5xx, in OpenAI's shape, which clients and SDKs parse:
``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.jobs.store import FactConflictError, NotFoundError, StoreUnavailableError
from server.packs.errors import (
    InvalidPackRefError,
    PackCorruptError,
    PackIncompatibleError,
    PackNotFoundError,
)

log = logging.getLogger(__name__)


# an absolute POSIX path, or what follows a URL's scheme (a database URL names host and user)
_PATH = re.compile(r"(?<![\w.~-])/[^\s'\",;()\[\]{}]+")


def redact_paths(text: str) -> str:
    """`text` with each absolute path cut to its last part (`…/table.safetensors`): messages
    from the pack store and the job worker name files, and a client must not learn the
    server's layout from them. The server log keeps the whole text."""
    return _PATH.sub(lambda m: "…/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or _default_type(status)
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, object]:
        """The envelope, also sent as the last event of a stream that fails mid-way."""
        return error_body(self.status, self.message, type_=self.type, param=self.param)


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status < 500:
        return "invalid_request_error"
    return "server_error"


def _status_code_name(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_")
    except ValueError:  # 499, nginx's "client closed request", is not in HTTPStatus
        return "client_closed_request" if status == 499 else f"status_{status}"


def error_body(
    status: int, message: str, *, type_: str | None = None, param: str | None = None
) -> dict[str, object]:
    return {
        "error": {
            "message": message,
            "type": type_ or _default_type(status),
            "param": param,
            "code": _status_code_name(status),
        }
    }


def error_response(
    status: int,
    message: str,
    *,
    type_: str | None = None,
    param: str | None = None,
    retry_after: int | None = None,
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    body = error_body(status, message, type_=type_, param=param)
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    problems, first_param = [], None
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "header", "query")]
        param = ".".join(loc) or None
        first_param = first_param or param
        problems.append(f"{param}: {error.get('msg')}" if param else str(error.get("msg")))
    return "; ".join(problems) or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(
            exc.status, exc.message, type_=exc.type, param=exc.param, retry_after=exc.retry_after
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(422, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(InvalidPackRefError)
    async def _bad_pack_ref(_: Request, exc: InvalidPackRefError) -> JSONResponse:
        return error_response(422, str(exc), param="pack")

    @app.exception_handler(PackNotFoundError)
    async def _pack_not_found(_: Request, exc: PackNotFoundError) -> JSONResponse:
        return error_response(404, redact_paths(str(exc)), param="pack")

    @app.exception_handler(PackIncompatibleError)
    async def _pack_incompatible(_: Request, exc: PackIncompatibleError) -> JSONResponse:
        return error_response(409, redact_paths(str(exc)), param="pack")

    @app.exception_handler(PackCorruptError)
    async def _pack_corrupt(_: Request, exc: PackCorruptError) -> JSONResponse:
        log.error("corrupt pack: %s", exc)
        return error_response(500, f"pack cannot be loaded: {redact_paths(str(exc))}")

    @app.exception_handler(StoreUnavailableError)
    async def _store_down(_: Request, exc: StoreUnavailableError) -> JSONResponse:
        log.error("%s", exc)
        return error_response(
            503, "the job store is unavailable; nothing was written, retry shortly", retry_after=5
        )

    @app.exception_handler(NotFoundError)
    async def _job_not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return error_response(404, str(exc))

    @app.exception_handler(FactConflictError)
    async def _fact_conflict(_: Request, exc: FactConflictError) -> JSONResponse:
        return error_response(409, str(exc), param="facts")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal server error; see the server log")
