"""A small HTTP JSON service over a recommender (standard library ``http.server`` + pydantic validation).

Endpoints (docs/serving_http.md has examples):

- ``POST /recommend`` with ``{"history": [item_id, ...], "k": 10, "exclude_history": false}`` returns
  ``{"model_version", "items": [{"item_id", "title", "score", "rank"}], "dropped": [unknown ids]}``.
- ``GET /health`` returns ``{"status": "ok", "model_version", "n_items"}``.

Every response is JSON, carries the model version in the body and in an ``X-Model-Version`` header, and
bad input always gets a 4xx that says what is wrong (never a traceback): 400 malformed JSON (also nested too
deeply) or a validation error naming the field, 404 unknown path, 405 wrong method, 408 a client that stops
sending mid-request for longer than ``request_timeout`` (the headers or the body), 411 no Content-Length, 413
body too large, 422 when the recommender rejects the history (its ``ValueError`` message). Only a fault of the
server is a 500 (a short JSON error, the traceback in the log); a client that goes away is never logged as
one.

The server is a ``ThreadingHTTPServer`` (one thread per connection, HTTP/1.1 keep-alive); the recommender's
``recommend`` must be safe to call from several threads at once (onnxruntime's ``InferenceSession.run`` is).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import signal
import threading
import uuid
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, ValidationInfo,
                      field_validator)

logger = logging.getLogger("laser.service")

MAX_HISTORY = 1000
DEFAULT_K = 10
DEFAULT_MAX_K = 100
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: 1,000 history ids of ~1 KB each would still fit
DEFAULT_REQUEST_TIMEOUT = 30.0  # seconds a client may stall mid-request (408 after it)
# A refused body up to this size is read and discarded before closing, so the client reliably gets the 413
# (closing a socket with unread data makes the kernel send a reset that can destroy the response in flight).
_MAX_DRAIN_BYTES = 16 << 20


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
    """The body of ``POST /recommend``; ``k``'s upper bound comes from the validation context."""

    model_config = ConfigDict(extra="forbid")

    history: list[StrictStr] = Field(min_length=1, max_length=MAX_HISTORY)
    k: StrictInt = Field(default=DEFAULT_K, ge=1)
    exclude_history: StrictBool = False

    @field_validator("k")
    @classmethod
    def _k_within_limit(cls, k: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_k")
        if limit is not None and k > limit:
            raise ValueError(f"must be at most {limit} ({(info.context or {}).get('max_k_reason', 'max_k')})")
        return k


class RequestError(Exception):
    """A client error answered with ``status`` and a JSON body ``{"error": kind, "message": ...}``."""

    def __init__(self, status: int, kind: str, message: str, details: list[dict[str, Any]] | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.details = details
        self.close = close


def _format_loc(loc: Sequence[Any]) -> str:
    """pydantic's error location as a path: ("history", 3) -> "history[3]"; () -> "body"."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "body"


def validation_details(exc: ValidationError) -> list[dict[str, str]]:
    """One ``{"field", "problem"}`` per pydantic error, in a form a client can show."""
    details = []
    for err in exc.errors(include_url=False, include_input=False):
        problem = err["msg"]
        if problem.startswith("Value error, "):
            problem = problem[len("Value error, "):]
        details.append({"field": _format_loc(err["loc"]), "problem": problem})
    return details


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
        out.append({"item_id": str(_get(item, "item_id")),
                    "title": None if title is None else str(title),
                    "score": score,
                    "rank": int(_get(item, "rank", position))})
    body: dict[str, Any] = {"model_version": model_version, "items": out, "dropped": [str(i) for i in dropped]}
    fallback = _get(result, "fallback", None)
    if fallback is not None:  # e.g. "popularity": no known item, the recommender answered with popular items
        body["fallback"] = str(fallback)
    return body


class LaserHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` holding the recommender and the request limits."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog: bursts of concurrent clients are queued, not refused

    def __init__(self, address: tuple[str, int], recommender: RecommenderLike, *, max_k: int = DEFAULT_MAX_K,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        if max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {max_k}")
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout}")
        self.recommender = recommender
        self.model_version = str(recommender.model_version)
        # header-safe: printable ASCII only (no CR/LF can reach the header block)
        self.model_version_header = "".join(c if 32 <= ord(c) < 127 else "?" for c in self.model_version)
        self.n_items = int(recommender.n_items)
        self.max_k = min(max_k, self.n_items) if self.n_items > 0 else max_k
        self.max_k_reason = ("the catalogue size" if self.n_items and self.max_k == self.n_items
                             else "the server's max_k")
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        super().__init__(address, _Handler)


_ROUTES: dict[str, tuple[str, ...]] = {"/recommend": ("POST",), "/health": ("GET",)}
# a client that hung up, reset the connection, or stopped reading or sending for longer than request_timeout
_CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class _Handler(BaseHTTPRequestHandler):
    server: LaserHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries a Content-Length
    server_version = "laser-service"

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # a stalled client cannot hold a thread forever
        super().setup()

    # --- responses -------------------------------------------------------------------------------------
    def _send_json(self, status: int, body: Mapping[str, Any], extra_headers: Mapping[str, str] | None = None,
                   close: bool = False) -> None:
        # a lone surrogate (a client may send "\udc00" in an id that is then echoed in "dropped" or an error)
        # cannot be UTF-8: backslashreplace writes it as the JSON escape \udc00 inside its string
        payload = json.dumps(body, allow_nan=False, ensure_ascii=False).encode("utf-8", "backslashreplace")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Model-Version", self.server.model_version_header)
        self.send_header("Cache-Control", "no-store")
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _send_error_json(self, status: int, kind: str, message: str, details: list[dict[str, Any]] | None = None,
                         extra_headers: Mapping[str, str] | None = None, close: bool = False) -> None:
        body: dict[str, Any] = {"error": kind, "message": message, "model_version": self.server.model_version}
        if details:
            body["details"] = details
        self._send_json(status, body, extra_headers, close)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, oversized headers, unknown method) as JSON too."""
        try:
            short = HTTPStatus(code).phrase
        except ValueError:
            short = "error"
        if not hasattr(self, "command") or self.command is None:
            self.command = ""
        if code == HTTPStatus.NOT_IMPLEMENTED:  # a method http.server has no do_* for
            self._send_error_json(405, "method_not_allowed", f"method {self.command!r} is not supported",
                                  close=True)
            return
        self._send_error_json(code, short.lower().replace(" ", "_"), message or explain or short, close=True)

    def handle_one_request(self) -> None:
        """http.server's request loop; a client that goes away while it is answered (an error answer included)
        only closes its connection: socketserver would print the exception as a traceback."""
        try:
            super().handle_one_request()
        except _CLIENT_GONE:
            self.close_connection = True

    def parse_request(self) -> bool:
        """http.server's request-line and header parsing; a client that stalls inside its headers gets a 408
        (http.server would drop the connection without an answer)."""
        try:
            return super().parse_request()
        except TimeoutError:
            self.send_error(408, f"no complete request headers within {self.server.request_timeout:g} s")
            return False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        logger.debug("%s - %s", self.address_string(), format % args)

    # --- routing ---------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        path = ""
        try:
            try:
                path = urlsplit(self.path).path
            except ValueError:  # e.g. an absolute-form target with a broken host ("http://[::1")
                raise RequestError(400, "bad_request", f"malformed request target {self.path[:200]!r}",
                                   close=True) from None
            allowed = _ROUTES.get(path)
            if allowed is None or self.command not in allowed or path != "/recommend":
                # no body is wanted here: skip a declared one so the connection stays usable
                reusable = self._skip_body()
                if allowed is None:
                    raise RequestError(404, "not_found", f"no endpoint at {path!r}; endpoints: "
                                       + ", ".join(f"{m} {p}" for p, ms in _ROUTES.items() for m in ms),
                                       close=not reusable)
                if self.command not in allowed:
                    raise RequestError(405, "method_not_allowed",
                                       f"{path} accepts {', '.join(allowed)}, not {self.command}",
                                       close=not reusable)
                self._send_json(200, {"status": "ok", "model_version": self.server.model_version,
                                      "n_items": self.server.n_items}, close=not reusable)
            else:
                self._recommend()
        except RequestError as exc:
            headers = {"Allow": ", ".join(_ROUTES[path])} if exc.status == 405 else None
            self._send_error_json(exc.status, exc.kind, exc.message, exc.details, headers, exc.close)
        except _CLIENT_GONE:  # the client went away, or stopped reading its answer for request_timeout
            self.close_connection = True
        except Exception:  # noqa: BLE001 - the service's last line: log it, answer a short 500
            request_id = uuid.uuid4().hex[:12]
            logger.exception("unhandled error in %s %s (request %s)", self.command, path, request_id)
            try:
                self._send_error_json(500, "internal_error",
                                      f"internal server error (request {request_id}; see the server log)",
                                      close=True)
            except OSError:
                self.close_connection = True

    def _skip_body(self) -> bool:
        """Discard a declared body this endpoint does not use; False when the connection cannot be reused."""
        if self.headers.get("Transfer-Encoding"):
            return False
        raw = self.headers.get("Content-Length")
        if raw is None:
            return True
        try:
            length = int(raw)
        except ValueError:
            return False
        if length < 0 or length > _MAX_DRAIN_BYTES:
            return False
        return self._discard(length)

    # --- POST /recommend -------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "length_required",
                               "chunked request bodies are not supported; send a Content-Length", close=True)
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise RequestError(411, "length_required", "POST /recommend needs a Content-Length header",
                               close=True)
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            raise RequestError(400, "bad_request", f"invalid Content-Length {raw!r}", close=True) from None
        limit = self.server.max_body_bytes
        if length > limit:
            if length <= _MAX_DRAIN_BYTES:
                self._discard(length)
            raise RequestError(413, "payload_too_large",
                               f"request body is {length} bytes; the limit is {limit} bytes", close=True)
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise RequestError(408, "request_timeout", f"the request body stopped arriving: not all of its "
                               f"{length} bytes came within {self.server.request_timeout:g} s", close=True) from None
        if len(body) != length:
            raise RequestError(400, "bad_request",
                               f"request body ended after {len(body)} of {length} bytes", close=True)
        return body

    def _discard(self, length: int) -> bool:
        """Read and drop ``length`` body bytes; False if the client stopped sending first."""
        remaining = length
        try:
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 16))
                if not chunk:
                    return False
                remaining -= len(chunk)
        except OSError:  # a timeout or reset while discarding: the error response is still attempted
            return False
        return True

    def _parse(self, body: bytes) -> RecommendRequest:
        try:
            data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError as exc:
            raise RequestError(400, "malformed_json",
                               f"request body is not UTF-8: {exc.reason} at byte {exc.start}") from None
        except json.JSONDecodeError as exc:
            raise RequestError(400, "malformed_json", f"request body is not valid JSON: {exc.msg} "
                               f"(line {exc.lineno}, column {exc.colno})") from None
        except ValueError as exc:  # NaN / Infinity, an integer of more than 4,300 digits
            raise RequestError(400, "malformed_json", f"request body is not valid JSON: {exc}") from None
        except RecursionError:  # arrays/objects nested about 1,000 deep exhaust the parser's recursion limit
            raise RequestError(400, "malformed_json", "request body is nested too deeply to parse") from None
        if not isinstance(data, dict):
            kind = "null" if data is None else {list: "array", str: "string", bool: "boolean"}.get(
                type(data), "number")
            raise RequestError(400, "validation_error", f"body: expected a JSON object, got a JSON {kind}",
                               [{"field": "body", "problem": f"expected a JSON object, got a JSON {kind}"}])
        try:
            return RecommendRequest.model_validate(
                data, context={"max_k": self.server.max_k, "max_k_reason": self.server.max_k_reason})
        except ValidationError as exc:
            details = validation_details(exc)
            message = "; ".join(f"{d['field']}: {d['problem']}" for d in details)
            raise RequestError(400, "validation_error", message, details) from None

    def _recommend(self) -> None:
        request = self._parse(self._read_body())
        recommender = self.server.recommender
        try:
            result = recommender.recommend(list(request.history), k=request.k,
                                           exclude_history=request.exclude_history)
        except ValueError as exc:
            raise RequestError(422, "unprocessable_history",
                               str(exc) or "the recommender rejected the history") from None
        self._send_json(200, result_to_json(result, self.server.model_version))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


class ListenError(OSError):
    """The server cannot listen on the address asked for (busy port, unknown host, no permission)."""


def make_server(recommender: RecommenderLike, host: str = "127.0.0.1", port: int = 0, *,
                max_k: int = DEFAULT_MAX_K, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> LaserHTTPServer:
    """A bound (not yet serving) server; ``port=0`` picks a free port, read it from ``server.server_address``.

    Run it with :func:`serve_server` (or ``server.serve_forever()`` in a thread, stopped with
    ``server.shutdown()`` from another thread, then ``server.server_close()``). ``max_k`` caps ``k`` (also
    capped at the catalogue size); ``max_body_bytes`` caps the request body (413 beyond it);
    ``request_timeout`` is the socket timeout in seconds: a client that stalls mid-request that long gets a
    408. An address that cannot be bound (e.g. a busy port) is a :class:`ListenError` with a one-line message.
    """
    for name in ("recommend", "model_version", "n_items"):
        if not hasattr(recommender, name):
            raise TypeError(f"recommender {type(recommender).__name__} has no {name!r} (see RecommenderLike)")
    try:
        return LaserHTTPServer((host, port), recommender, max_k=max_k, max_body_bytes=max_body_bytes,
                               request_timeout=request_timeout)
    except OSError as exc:
        hint = " (another process is listening there: stop it or choose another port)" \
            if exc.errno == errno.EADDRINUSE else ""
        error = ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}")
        error.errno = exc.errno
        raise error from None


def serve_server(server: LaserHTTPServer) -> None:
    """Serve a bound server until Ctrl-C (or SIGTERM when called from the main thread), then close it."""
    bound_host, bound_port = server.server_address[:2]
    previous = None
    if threading.current_thread() is threading.main_thread():
        def _terminate(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt
        previous = signal.signal(signal.SIGTERM, _terminate)
    logger.info("serving model %s (%d items) on http://%s:%d", server.model_version, server.n_items,
                bound_host, bound_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("shutting down")
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def serve(recommender: RecommenderLike, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    """Bind (:func:`make_server`; a busy port raises :class:`ListenError` before anything is served), then
    :func:`serve_server` until Ctrl-C or SIGTERM."""
    serve_server(make_server(recommender, host, port, **kwargs))


def main(argv: list[str] | None = None) -> None:
    """``python -m laser_core.service --bundle DIR [--host H] [--port P]``: serve an exported bundle."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m laser_core.service", description=main.__doc__)
    parser.add_argument("--bundle", required=True, help="an export bundle (laser_core.export.export_bundle)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (the log line names it)")
    parser.add_argument("--max-k", type=int, default=DEFAULT_MAX_K)
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT,
                        help="seconds a client may stall mid-request before it gets a 408")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--popularity-fallback", action="store_true",
                        help="answer an all-unknown history with the most popular items instead of 422")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from laser_core.serving import BundleError, Recommender  # onnxruntime only; never torch

    try:
        recommender = Recommender.load(args.bundle, popularity_fallback=args.popularity_fallback,
                                       threads=args.threads)
        server = make_server(recommender, args.host, args.port, max_k=args.max_k,
                             max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout)
    except (BundleError, ListenError, ValueError) as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    serve_server(server)


if __name__ == "__main__":
    main()
