"""The HTTP JSON service over a recommender: a FastAPI app (:func:`create_app`) served by uvicorn (:func:`serve`).

Endpoints (docs/serving_http.md has examples; the OpenAPI description is at ``/openapi.json``, the interactive
docs at ``/docs``):

- ``POST /recommend`` with ``{"history": [item_id, ...], "k": 10, "exclude_history": false}`` returns
  ``{"model_version", "items": [{"item_id", "title", "score", "rank"}], "dropped": [unknown ids]}``.
- ``GET /health`` (liveness) returns ``{"status": "ok", "model_version", "n_items"}``.
- ``GET /ready`` (readiness) returns 200 ``{"status": "ready", ...}`` while the app serves (after its startup),
  503 ``{"error": "not_ready", ...}`` before that and once a shutdown has begun.

Every response is JSON with the model version in an ``X-Model-Version`` header (and in the body of the answers
above and of every error). Errors are ``{"error": kind, "message": ..., "model_version"[, "details"]}``: 400 a
body that is not JSON (``malformed_json``: also one nested too deeply or not UTF-8) or that fails validation
(``validation_error``; ``details`` names each field and its problem), 404 unknown path, 405 wrong method (with
``Allow``), 413 a body over ``max_body_bytes``, 422 when the recommender rejects the history (its ``ValueError``
message). Only a fault of the server is a 500: a short JSON error with a request id, the traceback in the log.

``recommend`` runs in the app's thread pool, so the recommender must be safe to call from several threads at
once (onnxruntime's ``InferenceSession.run`` is). Nothing here imports torch.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import signal
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Protocol, runtime_checkable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("laser.service")

MAX_HISTORY = 1000
DEFAULT_K = 10
DEFAULT_MAX_K = 100
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: 1,000 history ids of ~1 KB each would still fit
DEFAULT_GRACEFUL_SHUTDOWN = 30.0  # seconds in-flight requests get after SIGTERM/SIGINT before they are cancelled


@runtime_checkable
class RecommenderLike(Protocol):
    """What the service needs from a recommender (``laser_core.serving.Recommender`` fits).

    ``recommend`` returns either a mapping with keys ``items`` and ``dropped`` or an object with those
    attributes; each item is a mapping or an object with ``item_id``, ``title``, ``score`` and optionally
    ``rank`` (1-based; the position in ``items`` is used when absent). It raises ``ValueError`` when the
    history cannot be used (e.g. no known item), which the service answers with 422 and the message.
    """

    model_version: str
    n_items: int

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
    413: "payload_too_large",
    422: "unprocessable_history",
    500: "internal_error",
    503: "not_ready",
}
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


class _ServiceMiddleware:
    """Pure ASGI: ``X-Model-Version`` and ``Cache-Control: no-store`` on every response, the request body limit
    (413 from the declared Content-Length before anything is read, or as soon as a body without one passes the
    limit), and the last line: a fault that escapes the app is logged with its traceback and answered with a short
    500 JSON error (no traceback to the client)."""

    def __init__(self, app: ASGIApp, model_version: str, max_body_bytes: int) -> None:
        self.app = app
        self.model_version = model_version
        # header-safe: printable ASCII only
        self.header = "".join(c if 32 <= ord(c) < 127 else "?" for c in model_version)
        self.max_body_bytes = max_body_bytes

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
            response = error_response(self.model_version, 413, self.too_large(f"{int(declared)} bytes"))
            await response(scope, receive, send_with_headers)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:  # FastAPI passes an HTTPException raised here on
                    raise HTTPException(413, self.too_large(f"over {received - 1} bytes"))
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


def create_app(
    recommender: RecommenderLike, *, max_k: int = DEFAULT_MAX_K, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> FastAPI:
    """The service as a FastAPI app over a loaded recommender (serve it with :func:`serve`, or any ASGI server).

    ``max_k`` caps ``k`` (also capped at the catalogue size); ``max_body_bytes`` caps the request body (413
    beyond it). ``GET /ready`` answers 200 from the app's startup (its lifespan) until ``app.state.ready`` is
    cleared (:func:`serve` clears it when a shutdown signal arrives, the lifespan's end does too).
    """
    for name in ("recommend", "model_version", "n_items"):
        if not hasattr(recommender, name):
            raise TypeError(f"recommender {type(recommender).__name__} has no {name!r} (see RecommenderLike)")
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False

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
    app.state.ready = False
    app.state.recommender = recommender
    errors = {status: {"model": ErrorResponse} for status in (400, 413, 422, 500)}
    error = functools.partial(error_response, model_version)

    def recommend(request: RecommendRequest) -> ServiceJSONResponse:
        """Top ``k`` items for ``history``. 400 names each invalid field; 422 when no history item can be
        used (unless the server answers those with its popularity fallback)."""
        try:
            result = recommender.recommend(list(request.history), k=request.k, exclude_history=request.exclude_history)
        except ValueError as exc:
            return error(422, str(exc) or "the recommender rejected the history")
        return ServiceJSONResponse(result_to_json(result, model_version))

    # the app's own request model (its max_k), as an evaluated annotation (this module's are strings)
    recommend.__annotations__["request"] = request_model
    app.post("/recommend", response_model=RecommendResponse, responses=errors, summary="Recommend items")(recommend)

    @app.get("/health", response_model=HealthResponse, summary="Liveness")
    def health() -> ServiceJSONResponse:
        """200 while the process serves requests."""
        return ServiceJSONResponse({"status": "ok", "model_version": model_version, "n_items": n_items})

    @app.get("/ready", response_model=HealthResponse, responses={503: {"model": ErrorResponse}}, summary="Readiness")
    def ready() -> ServiceJSONResponse:
        """200 when the service takes traffic; 503 before its startup and once a shutdown has begun."""
        if not app.state.ready:
            return error(503, "the service is not ready (starting or shutting down)")
        return ServiceJSONResponse({"status": "ready", "model_version": model_version, "n_items": n_items})

    app.add_middleware(_ServiceMiddleware, model_version=model_version, max_body_bytes=max_body_bytes)
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


class _Server(uvicorn.Server):
    """uvicorn's server; the first shutdown signal also turns ``/ready`` to 503 for requests still in flight."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.config.app.state.ready = False
        super().handle_exit(sig, frame)


def serve(
    app: FastAPI,
    sock: socket.socket,
    *,
    timeout_graceful_shutdown: float = DEFAULT_GRACEFUL_SHUTDOWN,
    access_log: bool = False,
) -> None:
    """Serve ``app`` with uvicorn on a bound socket (:func:`bind`) until SIGINT or SIGTERM, then shut down
    gracefully: stop accepting, let requests in flight finish (at most ``timeout_graceful_shutdown`` seconds),
    return normally. Logs ``serving model V (N items) on http://HOST:PORT`` once it listens."""
    config = uvicorn.Config(
        app,
        log_level="info",
        access_log=access_log,
        server_header=False,
        timeout_graceful_shutdown=timeout_graceful_shutdown,
        log_config=None,
    )
    server = _Server(config)
    host, port = sock.getsockname()[:2]
    recommender = app.state.recommender
    logger.info(
        "serving model %s (%d items) on http://%s:%d", recommender.model_version, recommender.n_items, host, port
    )
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
    logger.info("shut down")
