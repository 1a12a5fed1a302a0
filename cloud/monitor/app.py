"""The dashboard's web app (Starlette): the page and its assets (``/``, ``/static/...``), the run's state
as JSON (``/api/state``), a server-sent event stream of it (``/events``) and Prometheus (``/metrics``).
Read-only: every route answers GET (and HEAD) only; nothing on the page can change the run.
The page and its chart library are in the package (``static/``): it works with no internet."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from cloud.monitor.prometheus import PrometheusSink
from cloud.monitor.state import DashboardState

STATIC = Path(__file__).resolve().parent / "static"
POLL_SECONDS = 0.1  # how often the stream looks for a new version of the state
MIN_INTERVAL = 0.25  # at most 4 snapshots a second per viewer, however fast rounds go
KEEPALIVE_SECONDS = 15.0
TOKEN_COOKIE = "fedcmd_monitor_token"
# No inline script or style, nothing from elsewhere: the page can load only its own files.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def to_json(snapshot: dict[str, Any]) -> str:
    try:
        return json.dumps(snapshot, allow_nan=False, separators=(",", ":"), default=str)
    except ValueError:
        return json.dumps(_clean(snapshot), allow_nan=False, separators=(",", ":"), default=str)


class TokenGate:
    """With a token set, only requests carrying it (``?token=``, ``Authorization: Bearer``, or the cookie the
    page sets on its first load) get through; the rest get 401. Compared in constant time."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    def _given(self, scope: Scope) -> list[bytes]:
        found: list[bytes] = []
        from urllib.parse import parse_qs

        for value in parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", []):
            found.append(value.encode())
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                found.append(value[7:].strip())
            elif name == b"cookie":
                for part in value.split(b";"):
                    key, _, v = part.strip().partition(b"=")
                    if key == TOKEN_COOKIE.encode():
                        found.append(v)
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None:
            await self.app(scope, receive, send)
            return
        token = self.token
        if not any(hmac.compare_digest(g, token) for g in self._given(scope)):
            await PlainTextResponse("a token is required: open the URL the monitor printed", 401)(scope, receive, send)
            return

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                cookie = f"{TOKEN_COOKIE}={token.decode()}; Path=/; HttpOnly; SameSite=Strict".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-store")]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def build_app(state: DashboardState, prometheus: PrometheusSink | None = None, token: str | None = None,
              closing: Any = None) -> ASGIApp:
    """``closing()``: true once the server shuts down, so open event streams end at once."""

    def is_closing() -> bool:
        return bool(closing and closing())

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def api_state(request: Request) -> Response:
        return Response(to_json(state.snapshot()), media_type="application/json")

    async def stream(request: Request) -> Response:
        async def gen() -> Any:
            last = -1
            quiet = 0.0
            yield "retry: 1000\n\n"
            while not is_closing():
                version = state.version
                if version != last:
                    last, quiet = version, 0.0
                    yield f"event: state\ndata: {to_json(state.snapshot())}\n\n"
                    await asyncio.sleep(MIN_INTERVAL)
                    continue
                await asyncio.sleep(POLL_SECONDS)
                quiet += POLL_SECONDS
                if quiet >= KEEPALIVE_SECONDS:
                    quiet = 0.0
                    yield ": keepalive\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"x-accel-buffering": "no"})

    async def metrics(request: Request) -> Response:
        if prometheus is None:
            return PlainTextResponse("no metrics for finished runs\n", 404)
        body, content_type = prometheus.exposition()
        return Response(body, media_type=content_type)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": state.status, "version": state.version})

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/api/state", api_state, methods=["GET"]),
        Route("/events", stream, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes)
    return SecurityHeaders(TokenGate(app, token))
