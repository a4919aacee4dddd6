"""The HTTP JSON service over a recommender: a FastAPI app (:func:`create_app`) served by uvicorn (:func:`serve`).

Endpoints (docs/serving_http.md has examples; the OpenAPI description is at ``/openapi.json``, the interactive
docs at ``/docs``):

- ``POST /recommend`` with ``{"history": [item_id, ...], "k": 10, "exclude_history": false}`` returns
  ``{"model_version", "items": [{"item_id", "title", "score", "rank"}], "dropped": [unknown ids]}``.
- ``GET /health`` (liveness) returns ``{"status": "ok", "model_version", "n_items"}``.
- ``GET /ready`` (readiness) returns 200 ``{"status": "ready", ...}`` once a warm-up query has gone through the
  recommender (run in the background at the app's startup), 503 ``{"error": "not_ready", ...}`` before that, when
  the warm-up failed (logged once), and once a shutdown has begun.

Every response is JSON with the model version in an ``X-Model-Version`` header (and in the body of the answers
above and of every error). Errors are ``{"error": kind, "message": ..., "model_version"[, "details"]}``: 400 a
body that is not JSON (``malformed_json``: also one nested too deeply or not UTF-8) or that fails validation
(``validation_error``; ``details`` names each field and its problem), 404 unknown path, 405 wrong method (with
``Allow``), 413 a body over ``max_body_bytes``, 422 when the recommender rejects the history (its ``ValueError``
message). Only a fault of the server is a 500: a short JSON error with a request id, the traceback in the log.

``recommend`` runs in a scoring pool of ``scoring_threads`` threads (the recommender must be safe to call from
several threads at once; onnxruntime's ``InferenceSession.run`` is), while ``/health`` and ``/ready`` are answered
on the event loop, so they never wait behind scoring. A request body that does not arrive within ``body_timeout``
seconds is answered 408.

:func:`serve` guards the connections (uvicorn has no such settings; :class:`ServerSettings`): at most
``max_connections`` open (by default what the process's open-file limit leaves; at the limit a new connection
closes the connection idle the longest, or gets a 503 when none is idle), a request head must arrive within
``header_timeout`` seconds of the connection (or of its first byte after a keep-alive pause; 408 when part of it
came, a quiet close when nothing did), idle keep-alive connections are closed after ``keep_alive_timeout``
(uvicorn's ``timeout_keep_alive``), and asyncio's "socket.accept() out of system resource" error is logged at most
once per ``log_interval`` with a count. Nothing here imports torch.
"""

from __future__ import annotations

import array
import dataclasses
import errno
import functools
import http
import json
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Protocol, runtime_checkable

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # the count of bytes a socket holds unread (POSIX)
    from fcntl import ioctl as _ioctl
    from termios import FIONREAD as _FIONREAD
except ImportError:  # pragma: no cover - Windows
    _ioctl, _FIONREAD = None, 0

logger = logging.getLogger("laser.service")

MAX_HISTORY = 1000
DEFAULT_K = 10
DEFAULT_MAX_K = 100
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: 1,000 history ids of ~1 KB each would still fit
DEFAULT_GRACEFUL_SHUTDOWN = 30.0  # seconds in-flight requests get after SIGTERM/SIGINT before they are cancelled
DEFAULT_SCORING_THREADS = os.cpu_count() or 1  # recommend calls at once; more wait (on the event loop, not a thread)
DEFAULT_BODY_TIMEOUT = 30.0  # seconds from a request's head to the end of its body (1 MiB at 35 KB/s)
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds from a connection (or its first byte after a keep-alive pause) to a whole head
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0  # uvicorn's default: an idle keep-alive connection is closed after it
DEFAULT_MAX_HEADER_BYTES = 16 * 1024  # h11's default: a longer request head is a 400
DEFAULT_LOG_INTERVAL = 10.0  # at most one line per interval for the flood-born log lines (accept errors, limits)
FILE_MARGIN = 64  # open files kept free for the app (bundle files, logs, /proc reads) below the file limit
STARTING = "starting (the warm-up query has not finished)"
SHUTTING_DOWN = "shutting down"


@runtime_checkable
class RecommenderLike(Protocol):
    """What the service needs from a recommender (``laser_core.serving.Recommender`` fits).

    ``recommend`` returns either a mapping with keys ``items`` and ``dropped`` or an object with those
    attributes; each item is a mapping or an object with ``item_id``, ``title``, ``score`` and optionally
    ``rank`` (1-based; the position in ``items`` is used when absent). It raises ``ValueError`` when the
    history cannot be used (e.g. no known item), which the service answers with 422 and the message.
    ``item_ids`` are the catalogue's ids: the app's warm-up query recommends for the first of them.
    """

    model_version: str
    n_items: int
    item_ids: Sequence[str]  # the catalogue's ids; the warm-up query (GET /ready turns 200 after it) uses the first

    def recommend(self, history: list[str], k: int | None = None, exclude_history: bool = False) -> Any: ...


class RecommendRequest(BaseModel):
    """The body of ``POST /recommend``. ``k``'s upper bound is the app's (:func:`create_app` validates with a
    subclass that sets ``max_k``)."""

    model_config = ConfigDict(extra="forbid")
    max_k: ClassVar[int | None] = None
    max_k_reason: ClassVar[str] = "the server's max_k"

    history: list[StrictStr] = Field(
        min_length=1, max_length=MAX_HISTORY, description="Catalogue item ids, oldest first; unknown ids are dropped."
    )
    k: StrictInt = Field(
        default=DEFAULT_K,
        ge=1,
        description="Number of items to return (at most the server's max_k and the catalogue size).",
    )
    exclude_history: StrictBool = Field(default=False, description="Leave the history's items out.")

    @field_validator("k")
    @classmethod
    def _k_within_limit(cls, k: int) -> int:
        if cls.max_k is not None and k > cls.max_k:
            raise ValueError(f"must be at most {cls.max_k} ({cls.max_k_reason})")
        return k


# --------------------------------------------------------------------------- response models (OpenAPI docs)
class RecommendedItemBody(BaseModel):
    item_id: str
    title: str | None
    score: float
    rank: int


class RecommendResponse(BaseModel):
    model_version: str
    items: list[RecommendedItemBody]
    dropped: list[str] = Field(description="History ids that are not in the catalogue.")
    fallback: str | None = Field(
        default=None,
        description='Set (e.g. "popularity") when no history item '
        "was known and the recommender answered with its fallback.",
    )


class HealthResponse(BaseModel):
    status: str
    model_version: str
    n_items: int


class FieldProblem(BaseModel):
    field: str = Field(description='The field\'s path, e.g. "k", "history[3]", or "body" for the whole body.')
    problem: str


class ErrorResponse(BaseModel):
    error: str = Field(description="A short kind: validation_error, malformed_json, unprocessable_history, ...")
    message: str
    model_version: str
    details: list[FieldProblem] | None = None


# ------------------------------------------------------------------------------------------------ helpers
class ServiceJSONResponse(JSONResponse):
    """JSON without NaN; a lone surrogate (a client may send ``"\\udc00"`` in an id that is then echoed in
    ``dropped`` or an error) cannot be UTF-8: ``backslashreplace`` writes it as the JSON escape inside its string."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "backslashreplace"
        )


def _format_loc(loc: Sequence[Any]) -> str:
    """pydantic's error location as a path: ("body", "history", 3) -> "history[3]"; ("body",) -> "body"."""
    if loc and loc[0] == "body":
        loc = loc[1:]
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "body"


def validation_details(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """One ``{"field", "problem"}`` per pydantic error (``ValidationError.errors()`` or FastAPI's
    ``RequestValidationError.errors()``), in a form a client can show."""
    details = []
    for err in errors:
        problem = str(err["msg"])
        if problem.startswith("Value error, "):
            problem = problem[len("Value error, ") :]
        elif tuple(err["loc"]) == ("body",) and err["type"] in ("model_attributes_type", "dict_type"):
            problem = _not_an_object(err.get("input"))
        details.append({"field": _format_loc(err["loc"]), "problem": problem})
    return details


def _not_an_object(body: Any) -> str:
    """The problem with a body that is not a JSON object (FastAPI passes a body it did not parse as bytes)."""
    if isinstance(body, (bytes, bytearray)):
        return "expected a JSON object; send it with Content-Type: application/json"
    kind = "null" if body is None else {list: "array", str: "string", bool: "boolean"}.get(type(body), "number")
    return f"expected a JSON object, got a JSON {kind}"


def _get(obj: Any, name: str, default: Any = ...) -> Any:
    if isinstance(obj, Mapping):
        if name in obj:
            return obj[name]
    elif hasattr(obj, name):
        return getattr(obj, name)
    if default is ...:
        raise TypeError(f"recommender result has no {name!r} (got {type(obj).__name__})")
    return default


def result_to_json(result: Any, model_version: str) -> dict[str, Any]:
    """The response body for a recommender result (a mapping or an object with ``items``/``dropped``, and
    optionally ``fallback``: copied to the body when not None)."""
    items = _get(result, "items")
    dropped = _get(result, "dropped", [])
    out = []
    for position, item in enumerate(items, start=1):
        score = float(_get(item, "score"))
        if not math.isfinite(score):
            raise ValueError(f"recommender returned a non-finite score {score} for item {_get(item, 'item_id')!r}")
        title = _get(item, "title", None)
        out.append(
            {
                "item_id": str(_get(item, "item_id")),
                "title": None if title is None else str(title),
                "score": score,
                "rank": int(_get(item, "rank", position)),
            }
        )
    body: dict[str, Any] = {"model_version": model_version, "items": out, "dropped": [str(i) for i in dropped]}
    fallback = _get(result, "fallback", None)
    if fallback is not None:  # e.g. "popularity": no known item, the recommender answered with popular items
        body["fallback"] = str(fallback)
    return body


_ERROR_KINDS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    422: "unprocessable_history",
    500: "internal_error",
    503: "not_ready",
}
_CLOSE = {"Connection": "close"}  # the rest of a refused or timed-out request is not read: the connection ends
_ENDPOINTS = "POST /recommend, GET /health, GET /ready (API docs: GET /docs)"


def error_response(
    model_version: str,
    status: int,
    message: str,
    kind: str | None = None,
    details: list[dict[str, str]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> ServiceJSONResponse:
    """The service's error answer: ``{"error": kind, "message", "model_version"[, "details"]}``."""
    body: dict[str, Any] = {
        "error": kind or _ERROR_KINDS.get(status, "error"),
        "message": message,
        "model_version": model_version,
    }
    if details:
        body["details"] = details
    return ServiceJSONResponse(body, status_code=status, headers=dict(headers or {}))


def _header_value(text: str) -> str:
    """``text`` as a header value: printable ASCII only (others become ``?``)."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)


def raw_error_response(model_version: str, status: int, message: str, kind: str | None = None, **headers: str) -> bytes:
    """:func:`error_response` as the bytes of a whole HTTP/1.1 response that closes the connection, for answers
    written by the connection guard itself (no request reached the app)."""
    body = error_response(model_version, status, message, kind).body
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        f"x-model-version: {_header_value(model_version)}",
        "cache-control: no-store",
        "connection: close",
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _ServiceMiddleware:
    """Pure ASGI: ``X-Model-Version`` and ``Cache-Control: no-store`` on every response, the request body limit
    (413 from the declared Content-Length before anything is read, or as soon as a body without one passes the
    limit), the body timeout (408 when the body has not all arrived ``body_timeout`` seconds after the request
    head; both close the connection), and the last line: a fault that escapes the app is logged with its
    traceback and answered with a short 500 JSON error (no traceback to the client)."""

    def __init__(self, app: ASGIApp, model_version: str, max_body_bytes: int, body_timeout: float) -> None:
        self.app = app
        self.model_version = model_version
        self.header = _header_value(model_version)
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    def too_large(self, what: str) -> str:
        return f"request body is {what}; the limit is {self.max_body_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                headers["X-Model-Version"] = self.header
                headers["Cache-Control"] = "no-store"
            await send(message)

        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            response = error_response(self.model_version, 413, self.too_large(f"{int(declared)} bytes"), headers=_CLOSE)
            await response(scope, receive, send_with_headers)
            return
        received = 0
        body_done = False
        deadline = anyio.current_time() + self.body_timeout

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body only a disconnect can come: no deadline
                return await receive()
            with anyio.move_on_after(deadline - anyio.current_time()) as waited:
                message = await receive()
            if waited.cancelled_caught:  # FastAPI passes an HTTPException raised here on
                raise HTTPException(
                    408, f"the request body did not arrive within {self.body_timeout:g} s", headers=_CLOSE
                )
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self.too_large(f"over {received - 1} bytes"), headers=_CLOSE)
            return message

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except Exception:
            request_id = uuid.uuid4().hex[:12]
            logger.exception(
                "unhandled error in %s %s (request %s)", scope.get("method"), scope.get("path"), request_id
            )
            if started:  # the answer is under way: uvicorn closes the connection
                raise
            response = error_response(
                self.model_version, 500, f"internal server error (request {request_id}; see the server log)"
            )
            await response(scope, receive, send_with_headers)


def _install_error_handlers(app: FastAPI, model_version: str) -> None:
    """The service's error JSON for FastAPI's validation errors and Starlette's HTTP errors."""
    error = functools.partial(error_response, model_version)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if bad_json is not None:
            reason = (bad_json.get("ctx") or {}).get("error", "invalid JSON")
            return error(
                400, f"request body is not valid JSON: {reason} (at character {bad_json['loc'][-1]})", "malformed_json"
            )
        details = validation_details(errors)
        return error(400, "; ".join(f"{d['field']}: {d['problem']}" for d in details), "validation_error", details)

    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        cause = exc.__cause__  # FastAPI's "error parsing the body" keeps json.loads' own error as the cause
        if isinstance(cause, UnicodeDecodeError):
            return error(400, f"request body is not UTF-8: {cause.reason} at byte {cause.start}", "malformed_json")
        if isinstance(cause, RecursionError):  # arrays/objects nested about 1,000 deep
            return error(400, "request body is nested too deeply to parse", "malformed_json")
        if isinstance(cause, ValueError):
            return error(400, f"request body is not valid JSON: {cause}", "malformed_json")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no endpoint at {request.url.path!r}; endpoints: {_ENDPOINTS}"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{request.url.path} accepts {allowed}, not {request.method}"
        return error(exc.status_code, message, headers=exc.headers)

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)


def _warm_up(recommender: RecommenderLike, model_version: str) -> str:
    """One real query through the recommender and the answer's JSON, as a request takes them: a top-1 for a
    history of the catalogue's first item. Returns that item id."""
    ids = recommender.item_ids
    if len(ids) == 0:
        raise ValueError("the catalogue is empty")
    first = str(ids[0])
    result_to_json(recommender.recommend([first], k=1), model_version)
    return first


def create_app(
    recommender: RecommenderLike,
    *,
    max_k: int = DEFAULT_MAX_K,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    scoring_threads: int = DEFAULT_SCORING_THREADS,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> FastAPI:
    """The service as a FastAPI app over a loaded recommender (serve it with :func:`serve`, or any ASGI server).

    ``max_k`` caps ``k`` (also capped at the catalogue size); ``max_body_bytes`` caps the request body (413
    beyond it); ``body_timeout`` is the time a body has to arrive after its request head (408 after it).
    ``recommend`` runs on at most ``scoring_threads`` threads at once; ``/health`` and ``/ready`` on the event loop.
    The app's startup (its lifespan) starts a warm-up query (:func:`_warm_up`) in the scoring pool; ``GET /ready``
    answers 200 once it has succeeded, until ``app.state.ready`` is cleared (:func:`serve` clears it when a
    shutdown signal arrives, the lifespan's end does too). A failed warm-up is logged once; ``/ready`` stays 503.
    """
    for name in ("recommend", "model_version", "n_items", "item_ids"):
        if not hasattr(recommender, name):
            raise TypeError(f"recommender {type(recommender).__name__} has no {name!r} (see RecommenderLike)")
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    if scoring_threads < 1:
        raise ValueError(f"scoring_threads must be >= 1, got {scoring_threads}")
    if not body_timeout > 0:
        raise ValueError(f"body_timeout must be > 0 seconds, got {body_timeout}")
    model_version = str(recommender.model_version)
    n_items = int(recommender.n_items)
    limit = min(max_k, n_items) if n_items > 0 else max_k
    request_model = type(
        "RecommendRequest",
        (RecommendRequest,),
        {
            "__module__": __name__,
            "__doc__": RecommendRequest.__doc__,
            "max_k": limit,
            "max_k_reason": "the catalogue size" if n_items and limit == n_items else "the server's max_k",
        },
    )

    scoring = anyio.CapacityLimiter(scoring_threads)

    async def warm_up() -> None:
        try:
            first = await anyio.to_thread.run_sync(
                _warm_up, recommender, model_version, limiter=scoring, abandon_on_cancel=True
            )
        except Exception as exc:  # noqa: BLE001 - any failure keeps the service unready; logged once
            app.state.not_ready = f"the warm-up query failed ({type(exc).__name__}: {exc}; see the server log)"
            logger.error("warm-up query failed, GET /ready stays 503: %s: %s", type(exc).__name__, exc, exc_info=True)
            return
        if app.state.not_ready == STARTING:  # not shutting down meanwhile
            app.state.ready, app.state.not_ready = True, None
            logger.info("warm-up query (recommend [%r], k=1) answered: ready", first)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.not_ready = STARTING
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(warm_up)
            try:
                yield
            finally:
                app.state.ready, app.state.not_ready = False, SHUTTING_DOWN
                tasks.cancel_scope.cancel()

    app = FastAPI(
        title="Laser recommendation service",
        version=model_version,
        lifespan=lifespan,
        default_response_class=ServiceJSONResponse,
        strict_content_type=False,
        redirect_slashes=False,
        description="Top-k recommendations for a history of catalogue item ids (an exported Laser "
        f"bundle; model {model_version}, {n_items} items).",
    )
    app.state.ready, app.state.not_ready = False, STARTING
    app.state.recommender = recommender
    errors = {status: {"model": ErrorResponse} for status in (400, 413, 422, 500)}
    error = functools.partial(error_response, model_version)

    async def recommend(request: RecommendRequest) -> ServiceJSONResponse:
        """Top ``k`` items for ``history``. 400 names each invalid field; 422 when no history item can be
        used (unless the server answers those with its popularity fallback)."""
        query = functools.partial(
            recommender.recommend, list(request.history), k=request.k, exclude_history=request.exclude_history
        )
        try:  # in the scoring pool: the event loop stays free for other requests and the health checks
            result = await anyio.to_thread.run_sync(query, limiter=scoring)
        except ValueError as exc:
            return error(422, str(exc) or "the recommender rejected the history")
        return ServiceJSONResponse(result_to_json(result, model_version))

    # the app's own request model (its max_k), as an evaluated annotation (this module's are strings)
    recommend.__annotations__["request"] = request_model
    app.post("/recommend", response_model=RecommendResponse, responses=errors, summary="Recommend items")(recommend)

    # async: answered on the event loop, never queued behind the scoring threads
    @app.get("/health", response_model=HealthResponse, summary="Liveness")
    async def health() -> ServiceJSONResponse:
        """200 while the process serves requests."""
        return ServiceJSONResponse({"status": "ok", "model_version": model_version, "n_items": n_items})

    @app.get("/ready", response_model=HealthResponse, responses={503: {"model": ErrorResponse}}, summary="Readiness")
    async def ready() -> ServiceJSONResponse:
        """200 when the service takes traffic: after a warm-up query through the recommender, until a shutdown
        begins; 503 otherwise (the message says which)."""
        if not app.state.ready:
            return error(503, f"the service is not ready: {app.state.not_ready or SHUTTING_DOWN}")
        return ServiceJSONResponse({"status": "ready", "model_version": model_version, "n_items": n_items})

    app.add_middleware(
        _ServiceMiddleware, model_version=model_version, max_body_bytes=max_body_bytes, body_timeout=body_timeout
    )
    _install_error_handlers(app, model_version)
    return app


# ------------------------------------------------------------------------------------------------ serving
class ListenError(OSError):
    """The server cannot listen on the address asked for (busy port, unknown host, no permission)."""


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket (``port=0``: a free one, see ``getsockname()``); a failure is one :class:`ListenError`."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        hint = (
            " (another process is listening there: stop it or choose another port)"
            if exc.errno == errno.EADDRINUSE
            else ""
        )
        error = ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}")
        error.errno = exc.errno
        raise error from None
    return sock


def open_file_limit() -> int | None:
    """The process's soft open-file limit (``ulimit -n``, RLIMIT_NOFILE); None where there is none."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _open_files() -> int:
    """How many files the process has open now (Linux: /proc/self/fd; elsewhere a guess)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 32


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """How :func:`serve` guards its connections (``laser serve`` has an option for most; docs/serving_http.md).

    ``backlog``: the kernel's queue of connections not yet accepted (uvicorn's ``backlog``; a full queue drops new
    connections' SYNs and their clients retry after a second). ``accept_batch``: how many connections asyncio
    accepts at once (it opens, counts and closes them over the next loop turns); None: 1/16 of the open-file limit,
    16 to 2048. ``max_connections`` None: what the open-file limit leaves (:meth:`resolved`).
    """

    max_connections: int | None = None
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT
    timeout_graceful_shutdown: float = DEFAULT_GRACEFUL_SHUTDOWN
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    backlog: int = 2048
    accept_batch: int | None = None
    log_interval: float = DEFAULT_LOG_INTERVAL
    access_log: bool = False

    def resolved(self) -> ServerSettings:
        """The settings with ``max_connections`` and ``accept_batch`` filled in from the open-file limit and the
        files open now (call it once the recommender is loaded): the connections, the sockets accepted but not
        yet counted (up to 3 x ``accept_batch``) and ``FILE_MARGIN`` files for the app stay below the limit.
        ValueError names the setting that does not fit."""
        for name in ("header_timeout", "keep_alive_timeout", "log_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.timeout_graceful_shutdown < 0:
            raise ValueError(f"timeout_graceful_shutdown must be >= 0 seconds, got {self.timeout_graceful_shutdown}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be >= 1024, got {self.max_header_bytes}")
        for name in ("max_connections", "backlog", "accept_batch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        limit = open_file_limit()
        batch = self.accept_batch or (2048 if limit is None else max(16, min(2048, limit // 16)))
        if limit is None:
            return dataclasses.replace(self, max_connections=self.max_connections or 10_000, accept_batch=batch)
        room = limit - _open_files() - FILE_MARGIN - 3 * batch
        if room < 1 or (self.max_connections or 0) > room:
            want = "any connection" if self.max_connections is None else f"max_connections {self.max_connections}"
            raise ValueError(
                f"the open-file limit (ulimit -n) is {limit}: it leaves room for {max(room, 0)} connections, not "
                f"{want} ({_open_files()} files open now, {FILE_MARGIN} kept for the app, {3 * batch} for "
                f"connections being accepted {batch} at a time); raise the limit or lower max_connections"
            )
        return dataclasses.replace(self, max_connections=self.max_connections or room, accept_batch=batch)


class _Throttle:
    """At most one report per ``interval`` seconds: :meth:`due` says whether one is due, with the number of
    events that were not reported since the last one."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next_at = 0.0
        self.skipped = 0

    def due(self) -> int | None:
        now = time.monotonic()
        if now < self.next_at:
            self.skipped += 1
            return None
        skipped, self.skipped, self.next_at = self.skipped, 0, now + self.interval
        return skipped


class AcceptErrorLogFilter(logging.Filter):
    """On the ``asyncio`` logger: asyncio logs "socket.accept() out of system resource" with a traceback for
    every failed accept() (EMFILE, ENFILE: the file limit is reached; in Python 3.11 up to ``accept_batch`` times per
    loop turn). This passes one line per ``interval`` seconds, with the count of those it dropped, and no
    traceback; other records pass untouched."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, interval: float = DEFAULT_LOG_INTERVAL) -> None:
        super().__init__()
        self.throttle = _Throttle(interval)

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(self.MESSAGE)):
            return True
        skipped = self.throttle.due()
        if skipped is None:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else "out of system resource"
        record.msg = (
            "accept() failed: %s (open-file limit %s); new connections wait in the backlog, the server retries in 1 s%s"
        )
        record.args = (
            reason,
            open_file_limit(),
            f"; {skipped} more such errors in the last {self.throttle.interval:g} s not logged" if skipped else "",
        )
        record.exc_info, record.exc_text = None, None
        return True

    def flush(self) -> None:
        """Log the count of errors dropped since the last line (at shutdown)."""
        if self.throttle.skipped:
            logging.getLogger("asyncio").warning("%d more accept() errors not logged", self.throttle.skipped)
            self.throttle.skipped = 0


class _ConnectionGuard:
    """The connections of one server: at most ``max_connections`` open. At the limit a new connection closes
    another to make room (:meth:`_victim`): first a connection that has not completed a request and has none
    in progress (silent since it was accepted, or a head still incomplete: what a flood holds), then one whose
    request body is still arriving, the one whose last byte came the longest ago first (a stalled body would
    hold its slot for the whole body timeout), then the keep-alive connection idle the longest (a client that
    has been served). When every connection has a request with a whole body in the app it is answered 503 and
    closed. A request head must be whole within ``header_timeout`` seconds of the connection or of the first
    byte after a keep-alive pause. Logs at most one line per ``log_interval`` about connections closed or
    refused at the limit."""

    def __init__(self, settings: ServerSettings, model_version: str) -> None:
        assert settings.max_connections is not None, "resolve the settings first (ServerSettings.resolved)"
        self.max_connections = settings.max_connections
        self.header_timeout = settings.header_timeout
        self.open: set[_GuardedH11Protocol] = set()
        # the connections that may be closed to make room, each in the order they entered it (oldest first)
        self.fresh: OrderedDict[_GuardedH11Protocol, None] = OrderedDict()  # no request completed, none under way
        self.uploading: OrderedDict[_GuardedH11Protocol, None] = OrderedDict()  # a body arriving, by its last byte
        self.kept: OrderedDict[_GuardedH11Protocol, None] = OrderedDict()  # idle after a completed request
        self.counts = {"closed_at_limit": 0, "refused": 0, "head_timeouts": 0}
        self._since_log = {"closed_at_limit": 0, "refused": 0}
        self._throttle = _Throttle(settings.log_interval)
        self.refusal = raw_error_response(
            model_version,
            503,
            f"the server has {self.max_connections} connections open, each with a request in progress; retry shortly",
            "over_capacity",
            retry_after="1",
        )
        self.head_timeout = raw_error_response(
            model_version, 408, f"the request head did not arrive within {self.header_timeout:g} s"
        )

    def admit(self, conn: _GuardedH11Protocol) -> bool:
        if len(self.open) >= self.max_connections:
            victim = self._victim()
            if victim is None:
                self._count("refused")
                return False
            self.forget(victim)
            victim.close_idle()
            self._count("closed_at_limit")
        self.open.add(conn)
        self.fresh[conn] = None
        return True

    def _victim(self, look: int = 64) -> _GuardedH11Protocol | None:
        """The connection to close to make room, the first of: the longest-open fresh connection whose client
        has sent nothing the server has not read (silent, or a head that stalls); the longest-open fresh one whose
        head is still incomplete though part of it was read already (a head that trickles: its new bytes wait
        unread); the upload stalled longest; the longest-idle keep-alive connection; the longest-open fresh
        connection with bytes not yet read. Those last bytes are most likely a whole request head that the event
        loop reads on its next turn (under a flood a turn accepts many connections), so such connections come
        last. Looks at ``look`` fresh ones at most."""
        unread = trickling = None
        for n, conn in enumerate(self.fresh):
            if n == look:
                break
            if not conn.has_unread_bytes():
                return conn
            if trickling is None and conn.head_started:
                trickling = conn
            unread = unread or conn
        return trickling or next(iter(self.uploading or self.kept), None) or unread

    def awaits_head(self, conn: _GuardedH11Protocol) -> bool:
        return conn in self.fresh or conn in self.kept

    def request_completed(self, conn: _GuardedH11Protocol) -> None:
        """The response went out and the connection stays open for the next request (the rest of a body the
        app did not read, if any, then counts against the header timeout)."""
        self.uploading.pop(conn, None)
        self.kept[conn] = None

    def request_started(self, conn: _GuardedH11Protocol, body_to_come: bool) -> None:
        for queue in (self.fresh, self.uploading, self.kept):
            queue.pop(conn, None)
        if body_to_come:
            self.uploading[conn] = None

    def body_progress(self, conn: _GuardedH11Protocol) -> None:
        """More of a body came: the upload goes last in line (the one stalled the longest is closed first)."""
        if conn in self.uploading:
            self.uploading.move_to_end(conn)

    def body_arrived(self, conn: _GuardedH11Protocol) -> None:
        self.uploading.pop(conn, None)

    def forget(self, conn: _GuardedH11Protocol) -> None:
        self.open.discard(conn)
        for queue in (self.fresh, self.uploading, self.kept):
            queue.pop(conn, None)

    def _count(self, what: str) -> None:
        self.counts[what] += 1
        self._since_log[what] += 1
        if self._throttle.due() is not None:
            logger.warning(
                "connection limit %d reached: %d connection(s) without a request in the app closed to make room, "
                "%d refused with 503 (in the last %g s at most)",
                self.max_connections,
                self._since_log["closed_at_limit"],
                self._since_log["refused"],
                self._throttle.interval,
            )
            self._since_log = dict.fromkeys(self._since_log, 0)


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under a :class:`_ConnectionGuard` (uvicorn's own timers cover only the keep-alive
    pause after a response; ``limit_concurrency`` counts connections but answers 503 only once a request head has
    come, so silent connections pile up until accept() fails)."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: Any = None,
        *,
        guard: _ConnectionGuard,
    ) -> None:
        super().__init__(config=config, server_state=server_state, app_state=app_state, _loop=_loop)
        self.guard = guard
        self.admitted = False
        self.head_timer: Any = None
        self.head_started = False  # bytes of a request head (or of what follows a response) have come

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if not self.guard.admit(self):
            transport.write(self.guard.refusal)
            transport.close()
            return
        self.admitted = True
        self._arm_head_timer()  # a connection that sends nothing is closed after header_timeout

    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return
        if self.guard.awaits_head(self):
            self.head_started = True
            if self.head_timer is None:  # the first byte after a keep-alive pause
                self._arm_head_timer()
        else:
            self.guard.body_progress(self)
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if not self.admitted or self.cycle is None:
            return
        if self.cycle is not cycle:  # a request head has come (or a pipelined one was next)
            self._cancel_head_timer()
            self.head_started = False
            self.guard.request_started(self, body_to_come=self.cycle.more_body)
        elif not self.cycle.more_body:
            self.guard.body_arrived(self)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timer
        if not self.admitted:
            return
        if self.transport.is_closing():  # answered with Connection: close: its slot is free
            self.guard.forget(self)
        elif self.cycle.response_complete:  # no pipelined request started: waiting for the next head
            self.guard.request_completed(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self.guard.forget(self)
        super().connection_lost(exc)

    def has_unread_bytes(self) -> bool:
        """Whether the client's bytes wait in the kernel, not yet read (FIONREAD; False where there is none)."""
        sock = self.transport.get_extra_info("socket")
        if sock is None or _ioctl is None:
            return False
        count = array.array("i", [0])
        try:
            _ioctl(sock.fileno(), _FIONREAD, count, True)
        except OSError:  # the connection is gone
            return False
        return count[0] > 0

    def close_idle(self) -> None:
        """Closed by the guard to make room (no request head yet, or a body still arriving: the app reads a
        disconnect)."""
        self._cancel_head_timer()
        self._unset_keepalive_if_required()
        self.transport.close()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self.head_timer = self.loop.call_later(self.guard.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        self.guard.counts["head_timeouts"] += 1
        if self.head_started:  # part of a head came: tell the client; a silent connection is just closed
            self.transport.write(self.guard.head_timeout)
        self.guard.forget(self)
        self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn's server; the first shutdown signal also turns ``/ready`` to 503 for requests still in flight.
    uvicorn's ``backlog`` is given to asyncio as both the kernel's listen queue and the accept batch; once
    listening, the queue is set to ``settings.backlog`` again (the batch stays ``settings.accept_batch``)."""

    settings: ServerSettings
    guard: _ConnectionGuard

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        for sock in sockets or []:
            sock.listen(self.settings.backlog)

    def handle_exit(self, sig: int, frame: Any) -> None:
        state = self.config.app.state
        state.ready, state.not_ready = False, SHUTTING_DOWN
        super().handle_exit(sig, frame)


def build_server(app: FastAPI, settings: ServerSettings | None = None) -> _Server:
    """A uvicorn server for ``app`` (from :func:`create_app`) under ``settings`` (resolved here when they are not
    yet); run it with ``server.run(sockets=[sock])``, stop it with ``server.should_exit = True``. The connection
    guard is ``server.guard``."""
    settings = settings or ServerSettings()
    if settings.max_connections is None or settings.accept_batch is None:
        settings = settings.resolved()
    guard = _ConnectionGuard(settings, str(app.state.recommender.model_version))
    config = uvicorn.Config(
        app,
        http=functools.partial(_GuardedH11Protocol, guard=guard),
        ws="none",
        log_level="info",
        access_log=settings.access_log,
        server_header=False,
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]  # a float works (call_later)
        timeout_graceful_shutdown=settings.timeout_graceful_shutdown,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=settings.max_header_bytes,
        backlog=settings.accept_batch,  # type: ignore[arg-type]  # the listen queue follows in _Server.startup
        log_config=None,
    )
    server = _Server(config)
    server.guard = guard
    server.settings = settings
    return server


def serve(app: FastAPI, sock: socket.socket, settings: ServerSettings | None = None) -> None:
    """Serve ``app`` with uvicorn on a bound socket (:func:`bind`) until SIGINT or SIGTERM, then shut down
    gracefully: stop accepting, let requests in flight finish (at most ``settings.timeout_graceful_shutdown``
    seconds), return normally. Logs ``serving model V (N items) on http://HOST:PORT`` once it listens, then the
    connection limits."""
    server = build_server(app, settings)
    settings = server.settings
    host, port = sock.getsockname()[:2]
    recommender = app.state.recommender
    logger.info(
        "serving model %s (%d items) on http://%s:%d", recommender.model_version, recommender.n_items, host, port
    )
    logger.info(
        "connections: at most %d open (open-file limit %s), backlog %d, accepted %d at a time; request head within "
        "%g s, idle keep-alive "
        "closed after %g s",
        settings.max_connections,
        open_file_limit(),
        settings.backlog,
        settings.accept_batch,
        settings.header_timeout,
        settings.keep_alive_timeout,
    )
    accept_errors = AcceptErrorLogFilter(settings.log_interval)
    logging.getLogger("asyncio").addFilter(accept_errors)
    # uvicorn re-raises the signal that stopped it once it is done; a no-op handler meanwhile makes that a normal
    # return (exit status 0) instead of a KeyboardInterrupt or a death by SIGTERM
    main = threading.current_thread() is threading.main_thread()  # (uvicorn handles signals only there too)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        accept_errors.flush()
        logging.getLogger("asyncio").removeFilter(accept_errors)
    logger.info("shut down")
