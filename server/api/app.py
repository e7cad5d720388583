"""The app factory. The lifespan opens the training side (job store, worker), then builds the
runtime (backbone, engine, scheduler, pack registry) once the backbone is loaded."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import __version__
from server.api import job_routes, openai_routes, pack_routes, routes
from server.api.auth import Authenticator
from server.api.errors import install_error_handlers
from server.api.limits import BodySizeLimit
from server.api.state import ServerState
from server.model import Backbone
from server.model.threads import pin_torch_threads
from server.settings import Settings

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` ("" and "0.0.0.0" mean every interface)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def create_app(settings: Settings, *, backbone: Backbone | None = None) -> FastAPI:
    """Build the app; pass `backbone` to serve an already-loaded model (tests, embedding).

    Raises KeysFileError when LKS_API_KEYS_FILE is set but unusable: the server must not start
    with auth silently off."""
    auth = Authenticator(settings.api_keys_file)
    if not auth.enabled and not is_loopback(settings.host):
        log.warning(
            "authentication is OFF and the server listens on %s, which is not loopback: anyone "
            "who reaches it can generate, submit facts and manage packs; create keys with "
            "`lks keys add` and set LKS_API_KEYS_FILE",
            settings.host,
        )
    state = ServerState.create(settings, auth)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # the threads that prepare requests and load packs run torch single-threaded: only the
        # engine's thread may hold a team of CPU threads (server/model/threads.py)
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(
                thread_name_prefix="lks-prepare",
                initializer=functools.partial(pin_torch_threads, 1, default=state.cpu_threads),
            )
        )
        # first: submissions are accepted while the model loads
        await asyncio.to_thread(state.training.open)
        if backbone is not None:
            state.attach(backbone)
        else:
            await state.load_in_background()
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(title="lks-server", version=__version__, lifespan=lifespan)
    app.state.lks = state
    install_error_handlers(app)
    state.metrics.install(app)
    app.include_router(routes.router)
    app.include_router(openai_routes.router)
    app.include_router(pack_routes.router)
    app.include_router(job_routes.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
