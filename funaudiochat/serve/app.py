"""The ASGI app: routes, API-key check, body limits, OpenAI error objects, health / readiness / metrics.

    ctx = ServerContext(scheduler, served_models=["fun-audio-chat"], api_key=None)
    app = create_app(ctx)          # Starlette; `funaudiochat serve` runs it with uvicorn

Other protocol modules plug in by name (`ROUTE_MODULES`): each defines `routes(ctx) -> list` of Starlette routes and
is mounted when present. `ctx` is `request.app.state.ctx` in handlers.
"""
from __future__ import annotations

import asyncio
import hmac
import importlib
import importlib.util
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from funaudiochat.serve.api_errors import APIError, bad_request, to_api_error
from funaudiochat.serve.audio_store import AudioStore
from funaudiochat.serve.chat_request import Limits
from funaudiochat.serve.openmp import one_thread_here
from funaudiochat.serve.scheduler import Scheduler
from funaudiochat.serve.voices import Voices

log = logging.getLogger(__name__)

# protocol modules added by name when they exist (the realtime WebSocket, the released demo's /api/chat, the page)
ROUTE_MODULES = ("funaudiochat.serve.realtime", "funaudiochat.serve.api_chat", "funaudiochat.serve.web")
OPEN_PATHS = ("/health", "/ready", "/metrics")  # no API key needed
# The page and its static files: a browser cannot send a key when it loads them; the page then sends the key the
# user types on its WebSocket (subprotocol), where it is checked.
OPEN_PREFIXES = ("/static/",)
PAGE_PATHS = ("/", "/index.html")


def needs_key(path: str) -> bool:
    return not (path in OPEN_PATHS or path in PAGE_PATHS or path.startswith(OPEN_PREFIXES))


@dataclass
class ServerContext:
    scheduler: Scheduler
    served_models: list[str]
    api_key: str | None = None
    voices: Voices | None = None
    audio_store: AudioStore = field(default_factory=AudioStore)
    limits: Limits = field(default_factory=Limits)
    max_body_bytes: int = 25 * 1024 * 1024
    created: int = 0
    warm_up: tuple = ()              # kinds of requests whose compiled graphs are built at start (serve/warm_up.py)
    warming: bool = False            # (set while they are)
    early_answer_ms: int = 200       # realtime server VAD: trailing silence a turn keeps, early answers (0: none)

    def __post_init__(self):
        if self.voices is None:
            self.voices = Voices(self.scheduler.detokenizer)

    @property
    def can_speak(self) -> bool:
        return self.scheduler.speech and self.scheduler.detokenizer is not None

    @property
    def metrics(self):
        return self.scheduler.metrics


# ------------------------------------------------------------------------------------------------ request helpers
async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (checked before reading when Content-Length is sent)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("invalid Content-Length header", None, "invalid_header")
        if int(declared) > limit:
            raise APIError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes",
                           None, "request_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", None, "request_too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # later request.form() / request.json() read this copy
    return body


async def read_json(request: Request, limit: int):
    body = await read_body(request, limit)
    if not body:
        raise bad_request("the request body is empty; send a JSON object", None, "invalid_json")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise bad_request(f"the request body is not valid JSON ({err})", None, "invalid_json") from None


async def watch_disconnect(request: Request, session) -> None:
    """After the body is read, the next ASGI message is the client's disconnect: cancel its session then."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            session.cancel()
            return


async def _warm_up(ctx: ServerContext) -> None:
    """Compile the decode graphs of the kinds of requests served before /ready says so (the server answers
    meanwhile; a failure is logged and leaves the graphs to be compiled by the first requests that need them)."""
    from funaudiochat.serve.warm_up import warm_up

    ctx.warming = True
    try:
        seconds = await warm_up(ctx.scheduler, ctx.warm_up)
        log.info("warm-up done in %.1f s: ready", seconds)
    except Exception:
        log.exception("warm-up failed; the first requests of each kind will compile their graphs")
    finally:
        ctx.warming = False


# ------------------------------------------------------------------------------------------------ small routes
async def health(request: Request):
    return JSONResponse({"status": "ok"})


async def ready(request: Request):
    ctx: ServerContext = request.app.state.ctx
    if not ctx.scheduler.alive:
        return JSONResponse({"status": "not ready", "reason": "the engine is not running"}, status_code=503)
    if ctx.warming:  # (requests are served meanwhile, but wait behind the compiles)
        return JSONResponse({"status": "not ready", "reason": "warming up: compiling the decode graphs"},
                            status_code=503)
    return JSONResponse({"status": "ready", "models": ctx.served_models, "sessions": ctx.scheduler.active_sessions,
                         "max_sessions": ctx.scheduler.max_sessions})


async def metrics(request: Request):
    ctx: ServerContext = request.app.state.ctx
    s = ctx.scheduler
    return PlainTextResponse(ctx.metrics.render(s.active_sessions, s.waiting_sessions, s.max_sessions),
                             media_type="text/plain; version=0.0.4")


async def list_models(request: Request):
    ctx: ServerContext = request.app.state.ctx
    return JSONResponse({"object": "list", "data": [_model_card(ctx, m) for m in ctx.served_models]})


async def get_model(request: Request):
    ctx: ServerContext = request.app.state.ctx
    name = request.path_params["model"]
    if name not in ctx.served_models:
        raise APIError(404, f"the model {name!r} does not exist", "model", "model_not_found")
    return JSONResponse(_model_card(ctx, name))


def _model_card(ctx: ServerContext, name: str) -> dict:
    return {"id": name, "object": "model", "created": ctx.created, "owned_by": "funaudiochat"}


# ------------------------------------------------------------------------------------------------ middleware
class GuardMiddleware:
    """API key on every path but the open ones (needs_key); request / error counts for /metrics."""

    def __init__(self, app, ctx: ServerContext):
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.ctx.api_key and needs_key(scope["path"]):
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not token or not hmac.compare_digest(token.encode(), self.ctx.api_key.encode()):
                what = "incorrect API key provided" if token else "missing API key: send 'Authorization: Bearer KEY'"
                response = APIError(401, what, None, "invalid_api_key").response()
                self.ctx.metrics.requests.inc()
                self.ctx.metrics.errors.inc()
                return await response(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.ctx.metrics.requests.inc()
                if message["status"] >= 400:
                    self.ctx.metrics.errors.inc()
            await send(message)

        await self.app(scope, receive, counting_send)


async def _api_error(request: Request, err: APIError):
    return err.response()


async def _http_error(request: Request, err: HTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return APIError(err.status_code, message.get(err.status_code, str(err.detail)), None, code).response()


async def _unexpected(request: Request, err: Exception):
    log.exception("unexpected error on %s", request.url.path)
    return to_api_error(err).response()


def create_app(ctx: ServerContext) -> Starlette:
    from funaudiochat.serve import openai_api

    routes = [Route("/health", health), Route("/ready", ready), Route("/metrics", metrics),
              Route("/v1/models", list_models), Route("/v1/models/{model:path}", get_model)] + openai_api.routes()
    for name in ROUTE_MODULES:
        if importlib.util.find_spec(name) is not None:
            routes += importlib.import_module(name).routes(ctx)

    @asynccontextmanager
    async def lifespan(app):
        # the executor's threads (audio decoding, voice registration) keep off the engine's cores' OpenMP team
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(initializer=one_thread_here))
        ctx.scheduler.start()
        warming = asyncio.create_task(_warm_up(ctx)) if ctx.warm_up else None
        try:
            yield
        finally:
            if warming is not None:
                warming.cancel()
            await asyncio.get_running_loop().run_in_executor(None, ctx.scheduler.close)

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _unexpected})
    app.state.ctx = ctx
    app.add_middleware(GuardMiddleware, ctx=ctx)
    return app
