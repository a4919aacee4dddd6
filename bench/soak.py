"""Soak test of the HTTP service (laser_core/service.py) on 127.0.0.1, with hostile and slow clients mixed in.

    python bench/soak.py                                  # 10,000 requests at concurrency 32 (the full soak)
    python bench/soak.py --smoke                          # 600 requests, a short flood, report in /tmp
    python bench/soak.py --requests 1000 --out /tmp/soak.json
    python bench/soak.py --bundle DIR                     # an existing bundle instead of the tiny one

The server is a separate process (``laser serve --bundle DIR --port 0``, run as ``python -m laser_cli.main
serve``: uvicorn, never torch), so its resident memory can be read from ``/proc/<pid>``. Without ``--bundle``
the bundle is built in a temporary folder first, as the tests build theirs: ``laser_core.export.export_bundle``
of a Laser around the tiny random Llama backbone (untrained M-Former, untrained BERT4Rec, a 40-item synthetic
catalogue); latency does not depend on the weights' values.

``--concurrency`` client threads take requests from one seeded schedule (``MIX``: kind -> share) until all
``--requests`` are done or ``--max-seconds`` have passed (then the rest are reported as not sent). Most are
``POST /recommend`` over keep-alive connections; mixed in are client errors (malformed JSON, JSON nested 5,000
deep, validation errors, all-unknown histories, unknown paths, wrong methods, a declared 32 MiB body) and slow
clients on their own sockets: bodies sent in pieces, responses read late in 16-byte pieces, clients that hang
up mid-body, and clients that stall: half a request head or half a body, then nothing (the server answers 408
after its ``--header-timeout`` / ``--body-timeout``, 2 s here, or closes the connection to make room during the
flood). Every kind has the statuses it must get; anything else is counted as unexpected. A request is
*answered* when a whole HTTP response came back (the hang-ups expect none).

The server runs with a low open-file limit (``--server-nofile``, 1024: the connection limit it derives from it is
in its log) so that a flood is cheap: from 20 % to 80 % of the requests done, a flood process holds
``--flood`` x that limit connections open, a third silent, a third sending a request head a byte every 0.5 s,
a third with half a body, and opens a new one for each the server closes, at most ``--flood-rate`` a second
(the server closes the longest-silent to make room, or answers 503 when every connection has a request in the
app: counted in ``flood``, not as the mix's 5xx). Meanwhile a prober process opens a new connection for
``GET /health`` every 50 ms for the whole run (``health_probe``: p50/p99/max overall and during the flood; a probe
that gets no 200 is a failure). Flood and prober are processes of their own, as a hostile client and a kubelet
are: as threads of this process they shared its GIL with the 32 workers, and its delays counted as the server's.

Reported (``bench/results/soak.json`` and ``.md``): requests served, statuses overall and per kind, 5xx count,
unanswered and unexpected counts (with examples), latency p50/p90/p99/max per kind (``recommend`` is the
service's real latency; the slow kinds include their deliberate delays), throughput, the server's RSS, threads,
open files and log size at start (after a warm-up), middle (half the requests done) and end, the flood's and the
health probe's figures, and whether the server log holds a traceback. ``passed`` is true when there is no 5xx,
no unanswered or unexpected request, no failed health probe and no traceback. ``goals``: ``/health`` p99 under
100 ms throughout, RSS growth under 50 MiB, server log under 1 MiB, zero 5xx for well-formed requests. Exit status
1 when not passed or a goal is missed. Latencies are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import multiprocessing
import os
import platform
import random
import re
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: request kind -> share of the schedule (normalized); the expected statuses are in EXPECTED
MIX: dict[str, float] = {
    "recommend": 0.70,
    "recommend_some_unknown": 0.04,
    "health": 0.04,
    "all_unknown": 0.02,
    "malformed_json": 0.015,
    "deep_json": 0.015,
    "validation_error": 0.02,
    "not_found": 0.01,
    "wrong_method": 0.01,
    "too_large": 0.01,
    "slow_sender": 0.04,
    "slow_reader": 0.04,
    "hang_up": 0.01,
    "stall_headers": 0.005,
    "stall_body": 0.015,
}
EXPECTED: dict[str, set[int | None]] = {
    "recommend": {200},
    "recommend_some_unknown": {200},
    "health": {200},
    "all_unknown": {422},
    "malformed_json": {400},
    "deep_json": {400},
    "validation_error": {400},
    "not_found": {404},
    "wrong_method": {405},
    "too_large": {413},
    "slow_sender": {200},
    "slow_reader": {200},
    "hang_up": {None},  # None: no response expected
    "stall_headers": {408, None},  # None: closed without an answer, to make room during the flood
    "stall_body": {408, None},
}
SLOW_KINDS = ("slow_sender", "slow_reader", "hang_up", "stall_headers", "stall_body")
KEEP_ALIVE_S = 5.0  # uvicorn's default keep-alive timeout: an idle connection is closed by the server after it
CLIENT_TIMEOUT_S = 60.0
_SERVING_LINE = re.compile(r"serving model .* on http://([^:\s]+):(\d+)")
_LIMIT_LINE = re.compile(r"connections: at most (\d+) open")
STALL_TIMEOUT_S = 2.0  # the server's --header-timeout and --body-timeout in the soak
HEALTH_EVERY_S = 0.05
GOALS = {"health_p99_ms": 100.0, "rss_growth_mib": 50.0, "log_bytes": 1 << 20}


# ------------------------------------------------------------------------------------------ the server
def build_tiny_bundle(out: Path, seed: int = 0) -> Path:
    """An export bundle of a Laser around the tiny random Llama (untrained parts; 40 items) in ``out``."""
    import torch

    from laser_core.data import leave_one_out, load_dataset
    from laser_core.data.text import TextConfig
    from laser_core.export import export_bundle, popularity_from_sequences, reference_model
    from laser_core.llm import BackboneConfig
    from laser_core.mformer import MFormerConfig
    from laser_core.model import BiTuneConfig, LaserSpec, LaserWeights, build_laser
    from laser_core.sr import SRConfig, build_model

    data = load_dataset({"synthetic": {"n_users": 100, "n_items": 40, "n_user_types": 4, "seed": seed}})
    torch.manual_seed(seed)
    encoder = build_model(SRConfig(model="bert4rec", hidden_size=16, max_len=8), data.n_items).eval()
    bitune = BiTuneConfig(mformer=MFormerConfig(n_experts=2, n_query=4, width=32, n_layers=1, n_heads=2, dropout=0.0))
    spec = LaserSpec(
        bitune=bitune,
        text=TextConfig(history_len=5),
        backbone=BackboneConfig(name="tiny-random-llama", quantization="none"),
        seed=seed,
    )
    laser = LaserWeights(
        spec=spec,
        state={
            name: value.detach().clone() for name, value in build_laser(spec, data.items, encoder).state_dict().items()
        },
    )
    with torch.inference_mode():
        table = reference_model(laser, encoder, data.items).embed_items(range(data.n_items))
    popularity = popularity_from_sequences(leave_one_out(data).train, data.n_items)
    return export_bundle(
        laser,
        encoder,
        data.items,
        table,
        out,
        k=10,
        popularity=popularity,
        metadata={"model_version": "soak-tiny-untrained"},
    )


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS (KiB) and Threads from ``/proc/<pid>/status``, and the open file count (Linux)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out["rss_kib" if key == "VmRSS" else "threads"] = int(value.split()[0])
        out["open_files"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        pass
    return out


class ServerProcess:
    """A server command run as a subprocess that logs ``serving model ... on http://HOST:PORT`` to stderr
    (``laser_core.service.serve`` does); its stderr goes to a file, read for the port and tracebacks."""

    def __init__(
        self, command: Sequence[str], start_timeout: float = 180.0, cwd: Path = ROOT, nofile: int | None = None
    ) -> None:
        self._log = tempfile.NamedTemporaryFile(prefix="laser-soak-server-", suffix=".log", delete=False)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.nofile = nofile

        def limit_files() -> None:  # in the child: its soft open-file limit
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        self.proc = subprocess.Popen(
            list(command),
            cwd=str(cwd),
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=env,
            preexec_fn=limit_files if nofile else None,
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + start_timeout
        while True:
            log = self.log()
            match, limit = _SERVING_LINE.search(log), _LIMIT_LINE.search(log)
            if match and limit:
                self.host, self.port = match.group(1), int(match.group(2))
                self.max_connections = int(limit.group(1))  # the server's connection limit (laser serve logs it)
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the server did not start (exit status {self.proc.returncode}):\n{self.log()[-3000:]}"
                )
            time.sleep(0.1)

    def log(self) -> str:
        return Path(self._log.name).read_text(encoding="utf8", errors="replace")

    def log_bytes(self) -> int:
        try:
            return Path(self._log.name).stat().st_size
        except OSError:
            return 0

    def status(self) -> dict[str, int]:
        return {**_proc_status(self.pid), "log_bytes": self.log_bytes()}

    def stop(self) -> int | None:
        """SIGINT (a clean shutdown), then SIGKILL if it has not exited within 30 s; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        Path(self._log.name).unlink(missing_ok=True)


def bundle_server_command(bundle: Path, threads: int) -> list[str]:
    """``laser serve`` (as ``python -m laser_cli.main serve``) on a free port of 127.0.0.1, with the soak's
    stall timeouts."""
    return [
        sys.executable,
        "-m",
        "laser_cli.main",
        "serve",
        "--bundle",
        str(bundle),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--threads",
        str(threads),
        "--header-timeout",
        str(STALL_TIMEOUT_S),
        "--body-timeout",
        str(STALL_TIMEOUT_S),
    ]


# ------------------------------------------------------------------------------------------ the clients
@dataclass
class Outcome:
    kind: str
    status: int | None  # None: no (complete) response
    latency_s: float
    problem: str | None = None  # why the outcome is unexpected, when it is

    @property
    def expected(self) -> bool:
        return self.problem is None


@dataclass
class Workload:
    """What the clients send: catalogue ids, the k range."""

    host: str
    port: int
    item_ids: list[str]
    max_k: int
    client_timeout: float = CLIENT_TIMEOUT_S

    def history(self, rng: random.Random) -> list[str]:
        return rng.sample(self.item_ids, rng.randint(1, min(12, len(self.item_ids))))

    def recommend_body(self, rng: random.Random) -> dict:
        return {"history": self.history(rng), "k": rng.randint(1, self.max_k), "exclude_history": rng.random() < 0.3}


def _read_response(sock: socket.socket, chunk: int = 65536, delay: float = 0.0) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of one HTTP/1.1 response with a Content-Length, read in ``chunk``-byte
    pieces with ``delay`` seconds between them."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(chunk)
        if not piece:
            raise ConnectionError(f"connection closed after {len(data)} bytes of the response head")
        data += piece
        time.sleep(delay)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("iso-8859-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        piece = sock.recv(chunk)
        if not piece:
            raise ConnectionError(f"connection closed after {len(body)} of {length} body bytes")
        body += piece
        time.sleep(delay)
    return status, headers, body


def _post_head(path: str, length: int, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\nContent-Length: {length}"
        f"\r\n{extra}\r\n"
    ).encode()


class Client:
    """One client thread's connections: a keep-alive ``http.client`` one for ordinary requests (reopened when it
    may have idled past the server's timeout) and a fresh socket per slow or raw request."""

    def __init__(self, work: Workload) -> None:
        self.work = work
        self.conn: http.client.HTTPConnection | None = None
        self.last_used = 0.0

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # ---- keep-alive requests
    def _http(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        if self.conn is None or time.monotonic() - self.last_used > KEEP_ALIVE_S / 2:
            self.close()  # the server may be closing an idle connection: do not race it
            self.conn = http.client.HTTPConnection(self.work.host, self.work.port, timeout=self.work.client_timeout)
        try:
            self.conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = self.conn.getresponse()
            data = resp.read()
        except BaseException:
            self.close()
            raise
        self.last_used = time.monotonic()
        if resp.will_close:
            self.close()
        return resp.status, data

    # ---- raw sockets
    def _socket(self) -> socket.socket:
        sock = socket.create_connection((self.work.host, self.work.port), timeout=self.work.client_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _raw(self, send: Callable[[socket.socket], None], chunk: int = 65536, delay: float = 0.0) -> tuple[int, bytes]:
        with self._socket() as sock:
            send(sock)
            status, _, body = _read_response(sock, chunk, delay)
            return status, body

    def run(self, kind: str, rng: random.Random) -> tuple[int | None, bytes]:
        """Send one request of ``kind``; (status or None, response body)."""
        work = self.work
        if kind in ("recommend", "recommend_some_unknown", "all_unknown", "validation_error"):
            body = work.recommend_body(rng)
            if kind == "recommend_some_unknown":
                body["history"] = [*body["history"], "no-such-item", "\udcff-not-unicode"]
            elif kind == "all_unknown":
                body["history"] = ["no-such-item", f"ghost-{rng.randint(0, 9999)}"]
            elif kind == "validation_error":
                body = rng.choice(
                    [
                        {**body, "k": 0},
                        {**body, "k": "3"},
                        {"history": []},
                        {**body, "extra": 1},
                        {"history": [1, 2]},
                        [body],
                        {**body, "k": work.max_k + 1000},
                    ]
                )
            return self._http("POST", "/recommend", json.dumps(body).encode())
        if kind == "health":
            return self._http("GET", "/health")
        if kind == "malformed_json":
            return self._http(
                "POST",
                "/recommend",
                rng.choice([b"{", b'{"history": [}', b"\xff\xfe", b"NaN", b'{"history": ["a"], "k": 1e999}x']),
            )
        if kind == "deep_json":
            depth = rng.choice([5_000, 50_000])
            return self._http("POST", "/recommend", b'{"history": ' + b"[" * depth + b"]" * depth + b"}")
        if kind == "not_found":
            return self._http("GET", rng.choice(["/nope", "/recommend/x", "/", "/health/"]))
        if kind == "wrong_method":
            return self._http(rng.choice(["GET", "PUT", "DELETE"]), "/recommend")
        self.close()  # raw and slow requests: the keep-alive connection would idle meanwhile
        payload = json.dumps(work.recommend_body(rng)).encode()
        if kind == "too_large":
            return self._raw(lambda s: s.sendall(_post_head("/recommend", 32 << 20)))
        if kind == "slow_sender":

            def dribble(sock: socket.socket) -> None:
                sock.sendall(_post_head("/recommend", len(payload)))
                step = max(1, len(payload) // 4)
                for lo in range(0, len(payload), step):
                    time.sleep(0.05)
                    sock.sendall(payload[lo : lo + step])

            return self._raw(dribble)
        if kind == "slow_reader":

            def late(sock: socket.socket) -> None:
                sock.sendall(_post_head("/recommend", len(payload)) + payload)
                time.sleep(0.3)

            return self._raw(late, chunk=16, delay=0.002)
        if kind == "hang_up":
            with self._socket() as sock:
                sock.sendall(_post_head("/recommend", len(payload)) + payload[: len(payload) // 3])
            return None, b""
        if kind in ("stall_headers", "stall_body"):  # then nothing: the server's timeout answers (or it closes)
            start = _post_head("/recommend", len(payload))
            start = start[: len(start) // 2] if kind == "stall_headers" else start + payload[: len(payload) // 2]
            try:
                return self._raw(lambda s: s.sendall(start))
            except ConnectionError:
                return None, b""
        raise ValueError(f"unknown request kind {kind!r}")


def check_outcome(kind: str, status: int | None, body: bytes, work: Workload) -> str | None:
    """Why the answer is wrong for ``kind`` (None when it is right)."""
    if status not in EXPECTED[kind]:
        return f"status {status}, expected {sorted(map(str, EXPECTED[kind]))}: {body[:200]!r}"
    if status is None:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return f"status {status} with a body that is not JSON: {body[:200]!r}"
    if status >= 400 and not (isinstance(data, dict) and data.get("error") and data.get("message")):
        return f"status {status} without an error and a message: {body[:200]!r}"
    if status == 200 and kind != "health":
        items = data.get("items") if isinstance(data, dict) else None
        if not items or any(not isinstance(it, dict) or "item_id" not in it for it in items):
            return f"status 200 without items: {body[:200]!r}"
    return None


# ------------------------------------------------------------------------------------------- the flood
FLOOD_KINDS = ("silent", "slow_head", "half_body")


_MP = multiprocessing.get_context("fork")  # the helpers run plain socket code; fork works however soak was imported


class _ChildProcess:
    """Runs ``self._run()`` in a forked process from :meth:`_start_child` until :meth:`_stop_child`, which
    returns the child's ``self._result()`` (sent back through a queue)."""

    def __init__(self) -> None:
        self._stop = _MP.Event()
        self._results = _MP.Queue()
        self._proc = _MP.Process(target=self._main, daemon=True)

    def _start_child(self) -> None:
        self._proc.start()

    def _stop_child(self) -> Any:
        self._stop.set()
        try:
            return self._results.get(timeout=60)
        finally:
            self._proc.join(timeout=10)

    def _main(self) -> None:  # in the child
        try:
            self._run()
        finally:
            self._results.put(self._result())

    def _run(self) -> None:
        raise NotImplementedError

    def _result(self) -> Any:
        raise NotImplementedError


class Flood(_ChildProcess):
    """Holds ``target`` connections open to the server (a third each of :data:`FLOOD_KINDS`) from
    :meth:`start` to :meth:`stop`, opening a new one for each the server closes or answers, at most ``rate``
    a second; counts what the server did with them. It runs in a process of its own, as a hostile client is
    not a thread of the load generator (its Python work would otherwise slow the workers and the prober, and
    count as the server's latency); ``on`` is set while it holds its connections."""

    def __init__(self, host: str, port: int, target: int, rate: float = 2000.0) -> None:
        super().__init__()
        self.host, self.port, self.target, self.rate = host, port, target, rate
        self.stats: dict[str, int] = dict.fromkeys(
            ("opened", "connect_errors", "closed_without_answer", "answered_503", "answered_408", "answered_other"),
            0,
        )
        self.stats["peak_open"] = 0
        self.seconds = 0.0
        self.on = _MP.Event()
        self.active = False

    def start(self) -> None:
        self.active = True
        self._started = time.monotonic()
        self.on.set()
        self._start_child()

    def stop(self) -> None:
        try:
            self.stats = self._stop_child()
        finally:
            self.on.clear()
            self.active = False
            self.seconds = round(time.monotonic() - self._started, 2)

    def _result(self) -> dict[str, int]:
        return self.stats

    def _open(self, kind: str) -> socket.socket | None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=5)
            if kind == "slow_head":
                sock.sendall(b"GET /health HTTP/1.1\r\n")
            elif kind == "half_body":
                sock.sendall(_post_head("/recommend", 200) + b'{"history": ["')
        except OSError:
            self.stats["connect_errors"] += 1
            return None
        sock.setblocking(False)
        self.stats["opened"] += 1
        return sock

    def _run(self) -> None:
        sel = selectors.DefaultSelector()  # epoll: more sockets than select() takes
        n = 0
        next_drip = time.monotonic() + 0.5
        budget, refilled = 0.0, time.monotonic()  # opens allowed now (a token bucket of ``rate`` a second)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                budget, refilled = min(self.rate * 0.1, budget + (now - refilled) * self.rate), now
                while len(sel.get_map()) < self.target and budget >= 1 and not self._stop.is_set():
                    budget -= 1
                    kind = FLOOD_KINDS[n % len(FLOOD_KINDS)]
                    n += 1
                    sock = self._open(kind)
                    if sock is None:
                        time.sleep(0.05)
                        break
                    sel.register(sock, selectors.EVENT_READ, kind)
                self.stats["peak_open"] = max(self.stats["peak_open"], len(sel.get_map()))
                for key, _ in sel.select(timeout=0.05):  # the server answered or closed: count, replace
                    sock = key.fileobj
                    try:
                        data = sock.recv(256)
                    except OSError:
                        data = b""
                    outcome = (
                        "closed_without_answer"
                        if not data
                        else {b"503": "answered_503", b"408": "answered_408"}.get(data[9:12], "answered_other")
                    )
                    self.stats[outcome] += 1
                    sel.unregister(sock)
                    sock.close()
                if time.monotonic() >= next_drip:  # slow heads: one more byte every 0.5 s
                    next_drip = time.monotonic() + 0.5
                    for key in list(sel.get_map().values()):
                        if key.data == "slow_head":
                            try:
                                key.fileobj.send(b"X")
                            except OSError:
                                pass
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()
            sel.close()


class HealthProbe(_ChildProcess):
    """``GET /health`` on a new connection every :data:`HEALTH_EVERY_S` seconds (as a kubelet probes), each
    timed from connect to the whole response and marked whether the flood was on; in a process of its own (a
    kubelet is not a thread of the load generator: there the workers' Python would delay it and count as the
    server's latency)."""

    def __init__(self, host: str, port: int, flood: Flood | None) -> None:
        super().__init__()
        self.host, self.port, self.flood = host, port, flood
        self.results: list[tuple[float, bool, str | None]] = []  # latency s, during the flood, failure

    def start(self) -> None:
        self._start_child()

    def stop(self) -> None:
        self.results = self._stop_child()

    def _result(self) -> list[tuple[float, bool, str | None]]:
        return self.results

    def _run(self) -> None:
        while not self._stop.wait(HEALTH_EVERY_S):
            flooding = self.flood is not None and self.flood.on.is_set()
            start = time.perf_counter()
            failure = None
            try:
                with socket.create_connection((self.host, self.port), timeout=10) as sock:
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
                    status, _, _ = _read_response(sock)
                if status != 200:
                    failure = f"status {status}"
            except (OSError, ValueError) as exc:
                failure = f"{type(exc).__name__}: {exc}"[:200]
            self.results.append((time.perf_counter() - start, flooding, failure))

    def summary(self) -> dict:
        failures = [f for _, _, f in self.results if f]
        return {
            "every_s": HEALTH_EVERY_S,
            "process": "its own (not a thread of the load generator)",
            "all": _latency_summary([t for t, _, f in self.results if not f]),
            "during_flood": _latency_summary([t for t, flooding, f in self.results if flooding and not f]),
            "failures": len(failures),
            "failure_examples": failures[:5],
        }


# ------------------------------------------------------------------------------------------- the run
def schedule(n: int, seed: int, mix: dict[str, float] = MIX) -> list[str]:
    """``n`` request kinds drawn with the ``mix`` shares, every kind at least once when ``n`` allows (seeded:
    the same run for the same arguments)."""
    rng = random.Random(seed)
    kinds = list(mix)
    plan = (kinds if n >= len(kinds) else []) + rng.choices(
        kinds, weights=[mix[k] for k in kinds], k=max(0, n - len(kinds)) if n >= len(kinds) else n
    )
    rng.shuffle(plan)
    return plan


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-quantile (0 < q <= 1) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(q * len(ordered))) - 1)]


def _latency_summary(latencies: Sequence[float]) -> dict:
    ms = [x * 1000 for x in latencies]
    return {
        "n": len(ms),
        **{
            name: None if percentile(ms, q) is None else round(percentile(ms, q), 2)
            for name, q in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99), ("max_ms", 1.0))
        },
    }


def run_soak(
    server: ServerProcess,
    item_ids: list[str],
    max_k: int,
    requests: int,
    concurrency: int,
    max_seconds: float,
    seed: int = 0,
    warmup: int = 640,
    sample_every: float = 0.25,
    progress: bool = False,
    flood: float = 1.5,
    flood_window: tuple[float, float] = (0.2, 0.8),
    flood_rate: float = 2000.0,
) -> dict:
    """Drive ``server`` with ``requests`` requests from ``concurrency`` threads, a flood of ``flood`` x the server's
    connection limit while the done requests are within ``flood_window`` (fractions; ``flood=0``: none) and the
    health probe throughout; the report (see the module doc)."""
    work = Workload(server.host, server.port, item_ids, max_k)
    target = math.ceil(flood * server.max_connections)
    flooder = Flood(server.host, server.port, target, flood_rate) if flood > 0 else None
    probe = HealthProbe(server.host, server.port, flooder)

    def warm(index: int) -> None:  # at full concurrency: onnxruntime and the allocator grow to their working set
        client, rng = Client(work), random.Random(-1 - index)
        try:
            for _ in range(-(-warmup // concurrency)):
                client.run("recommend", rng)
        finally:
            client.close()

    warmers = [threading.Thread(target=warm, args=(i,), daemon=True) for i in range(concurrency)]
    for t in warmers:
        t.start()
    for t in warmers:
        t.join()
    time.sleep(0.5)

    plan = schedule(requests, seed)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    next_index = iter(range(requests))
    done = threading.Event()
    deadline = time.monotonic() + max_seconds
    snapshots: dict[str, dict] = {"start": {**server.status(), "requests_done": 0}}
    samples: list[dict] = []
    t0 = time.monotonic()

    def monitor() -> None:
        while not done.wait(sample_every):
            with lock:
                n_done = len(outcomes)
            if (
                flooder is not None
                and not flooder.active
                and not flooder.seconds
                and n_done >= flood_window[0] * requests
            ):
                flooder.start()
            if flooder is not None and flooder.active and n_done >= flood_window[1] * requests:
                flooder.stop()
            status = {
                **server.status(),
                "t_s": round(time.monotonic() - t0, 2),
                "requests_done": n_done,
                "flood_on": bool(flooder and flooder.active),
            }
            samples.append(status)
            if "middle" not in snapshots and n_done >= requests // 2:
                snapshots["middle"] = status

    def worker(index: int) -> None:
        client = Client(work)
        rng = random.Random(seed * 1000 + index)
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                kind = plan[i]
                start = time.perf_counter()
                try:
                    status, body = client.run(kind, rng)
                    problem = check_outcome(kind, status, body, work)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    client.close()
                    status, problem = None, f"no response: {type(exc).__name__}: {exc}"[:300]
                outcome = Outcome(kind, status, time.perf_counter() - start, problem)
                with lock:
                    outcomes.append(outcome)
                    n_done = len(outcomes)
                if progress and n_done % max(1, requests // 10) == 0:
                    print(f"  {n_done}/{requests} requests, {time.monotonic() - t0:.0f} s", file=sys.stderr)
        finally:
            client.close()

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    probe.start()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic()) + work.client_timeout + 5)
    wall = time.monotonic() - t0
    done.set()
    watcher.join(timeout=5)
    if flooder is not None and flooder.active:
        flooder.stop()
    probe.stop()
    time.sleep(1.0)  # let the server finish closing the last connections
    snapshots.setdefault("middle", samples[len(samples) // 2] if samples else {})
    snapshots["end"] = {**server.status(), "requests_done": len(outcomes)}
    report = summarize(outcomes, requests, wall, snapshots, samples, server.log(), any(t.is_alive() for t in threads))
    report["flood"] = {
        "server_max_connections": server.max_connections,
        "server_open_file_limit": server.nofile,
        "target_open": flooder.target if flooder else 0,
        "kinds": list(FLOOD_KINDS),
        "window_of_requests_done": list(flood_window),
        "seconds": flooder.seconds if flooder else 0.0,
        "max_opens_per_s": flooder.rate if flooder else 0.0,
        **(flooder.stats if flooder else {}),
    }
    report["health_probe"] = probe.summary()
    report["passed"] = report["passed"] and report["health_probe"]["failures"] == 0
    report["goals"] = goals(report)
    return report


def goals(report: dict) -> dict:
    """Each goal of the soak (:data:`GOALS`) with the figure and whether it is met."""
    health_p99 = report["health_probe"]["all"]["p99_ms"]
    growth = report["memory"]["growth_start_to_end_mib"]
    log_bytes = report["server_log"]["bytes"]
    out = {
        "health_p99_under_ms": {
            "goal": GOALS["health_p99_ms"],
            "value": health_p99,
            "met": health_p99 is not None
            and health_p99 < GOALS["health_p99_ms"]
            and report["health_probe"]["failures"] == 0,
        },
        "rss_growth_under_mib": {
            "goal": GOALS["rss_growth_mib"],
            "value": growth,
            "met": growth is not None and growth < GOALS["rss_growth_mib"],
        },
        "server_log_under_bytes": {
            "goal": GOALS["log_bytes"],
            "value": log_bytes,
            "met": log_bytes < GOALS["log_bytes"],
        },
        "zero_5xx_for_well_formed_requests": {
            "goal": 0,
            "value": report["errors_5xx"],
            "met": report["errors_5xx"] == 0,
        },
    }
    out["all_met"] = all(v["met"] for v in out.values())
    return out


def summarize(
    outcomes: list[Outcome],
    planned: int,
    wall: float,
    snapshots: dict[str, dict],
    samples: list[dict],
    server_log: str,
    stuck_clients: bool,
) -> dict:
    statuses = Counter("none" if o.status is None else str(o.status) for o in outcomes)
    by_kind: dict[str, dict] = {}
    for kind in MIX:
        mine = [o for o in outcomes if o.kind == kind]
        if mine:
            by_kind[kind] = {
                "n": len(mine),
                "statuses": dict(sorted(Counter("none" if o.status is None else str(o.status) for o in mine).items())),
                "unexpected": sum(not o.expected for o in mine),
                **_latency_summary([o.latency_s for o in mine]),
            }
    expects_answer = [o for o in outcomes if None not in EXPECTED[o.kind]]
    unanswered = sum(o.status is None for o in expects_answer)
    unexpected = [o for o in outcomes if not o.expected]
    fast = [o.latency_s for o in outcomes if o.kind not in SLOW_KINDS and o.expected]

    def rss_mib(name: str) -> float | None:
        kib = snapshots.get(name, {}).get("rss_kib")
        return None if kib is None else round(kib / 1024, 1)

    rss = {name: rss_mib(name) for name in ("start", "middle", "end")}
    rss["peak"] = round(max((s.get("rss_kib", 0) for s in samples), default=0) / 1024, 1) or None
    growth = None if rss["start"] is None or rss["end"] is None else round(rss["end"] - rss["start"], 1)
    second_half = None if rss["middle"] is None or rss["end"] is None else round(rss["end"] - rss["middle"], 1)
    tracebacks = server_log.count("Traceback (most recent call last)")
    report = {
        "requests": {
            "planned": planned,
            "sent": len(outcomes),
            "not_sent_time_bound": planned - len(outcomes),
            "answered": sum(o.status is not None for o in outcomes),
            "expecting_an_answer": len(expects_answer),
            "unanswered": unanswered,
            "hang_ups_by_design": len(outcomes) - len(expects_answer),
            "unexpected": len(unexpected),
        },
        "served_ok_200": statuses.get("200", 0),
        "status_counts": dict(sorted(statuses.items())),
        "errors_5xx": sum(1 for o in outcomes if o.status is not None and o.status >= 500),
        "errors_by_status": {s: n for s, n in sorted(statuses.items()) if s != "200"},
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(outcomes) / wall, 1) if wall > 0 else None,
        "latency_ms": {
            "recommend": _latency_summary([o.latency_s for o in outcomes if o.kind == "recommend" and o.expected]),
            "all_fast_kinds": _latency_summary(fast),
        },
        "by_kind": by_kind,
        "memory": {
            "rss_mib": rss,
            "growth_start_to_end_mib": growth,
            "growth_middle_to_end_mib": second_half,
            "threads": {n: snapshots.get(n, {}).get("threads") for n in ("start", "middle", "end")},
            "open_files": {n: snapshots.get(n, {}).get("open_files") for n in ("start", "middle", "end")},
            "open_files_peak": max((s.get("open_files", 0) for s in samples), default=None),
            "log_bytes": {n: snapshots.get(n, {}).get("log_bytes") for n in ("start", "middle", "end")},
            "samples": samples[:: max(1, len(samples) // 200)],
        },
        "server_log": {
            "bytes": len(server_log.encode("utf8", "replace")),
            "lines": server_log.count("\n"),
            "accept_error_lines": server_log.count("accept() failed") + server_log.count("out of system resource"),
            "tracebacks": tracebacks,
            "unhandled_errors": server_log.count("unhandled error"),
            "warnings_or_errors": sum(
                1 for line in server_log.splitlines() if " WARNING " in line or " ERROR " in line
            ),
        },
        "stuck_clients": stuck_clients,
        "first_traceback": server_log[server_log.find("Traceback") :][:3000] if tracebacks else None,
        "unexpected_examples": [{"kind": o.kind, "status": o.status, "problem": o.problem} for o in unexpected[:10]],
    }
    report["passed"] = (
        report["errors_5xx"] == 0
        and unanswered == 0
        and not unexpected
        and tracebacks == 0
        and not stuck_clients
        and len(outcomes) == planned
    )
    return report


# ------------------------------------------------------------------------------------------- the report
def markdown(report: dict) -> str:
    from laser_core.reporting import markdown_table

    cfg, req, mem = report["config"], report["requests"], report["memory"]
    flood, probe = report["flood"], report["health_probe"]

    def num(value: float | None) -> str:
        return "" if value is None else f"{value:g}" if isinstance(value, int) else f"{value:.1f}"

    rec = report["latency_ms"]["recommend"]
    lines = [
        "# Soak of the HTTP service",
        "",
        f"`{report['command']}`: {cfg['requests']:,} requests at concurrency {cfg['concurrency']} on 127.0.0.1 "
        f"(server: `laser serve` (uvicorn), {cfg['server_threads']} onnxruntime thread(s); bundle: {cfg['bundle']}), "
        f"{report['machine']['logical_cpus']} CPUs, "
        f"load average at start {report['machine']['loadavg_start']}.",
        "",
        f"**{'PASSED' if report['passed'] else 'FAILED'}**: {req['sent']:,} sent in {report['wall_s']} s "
        f"({report['throughput_rps']} req/s), {report['served_ok_200']:,} served with 200, "
        f"{report['errors_5xx']} 5xx, {req['unanswered']} unanswered, {req['unexpected']} unexpected, "
        f"{report['server_log']['tracebacks']} tracebacks in the server log. `POST /recommend` latency p50 "
        f"{rec['p50_ms']} ms, p99 {rec['p99_ms']} ms.",
        "",
        f"Flood (server open-file limit {flood['server_open_file_limit']}, connection limit "
        f"{flood['server_max_connections']}): {flood['target_open']} connections held open "
        f"({', '.join(flood['kinds'])}) for {flood['seconds']} s, {flood.get('opened', 0):,} opened, "
        f"{flood.get('closed_without_answer', 0):,} closed by the server without an answer, "
        f"{flood.get('answered_503', 0):,} answered 503, {flood.get('answered_408', 0):,} answered 408, "
        f"{flood.get('connect_errors', 0):,} connects failed. `GET /health` probes (a new connection every "
        f"{probe['every_s']} s): p50 {probe['all']['p50_ms']} ms, p99 {probe['all']['p99_ms']} ms, max "
        f"{probe['all']['max_ms']} ms; during the flood p99 {probe['during_flood']['p99_ms']} ms; "
        f"{probe['failures']} failed. Server log: {report['server_log']['bytes']:,} bytes, "
        f"{report['server_log']['accept_error_lines']} accept-error lines.",
        "",
        "Goals: "
        + "; ".join(
            f"{name} {v['goal']}: {v['value']} ({'met' if v['met'] else 'MISSED'})"
            for name, v in report["goals"].items()
            if name != "all_met"
        )
        + ".",
        "",
        "Server memory (RSS, MiB) and resources: start (after a warm-up) / middle / end; growth start to end "
        f"{mem['growth_start_to_end_mib']} MiB, middle to end {mem['growth_middle_to_end_mib']} MiB.",
        "",
        markdown_table(
            ["", "start", "middle", "end", "peak"],
            [
                ["RSS MiB", *(num(mem["rss_mib"][n]) for n in ("start", "middle", "end", "peak"))],
                ["threads", *(mem["threads"][n] for n in ("start", "middle", "end")), ""],
                ["open files", *(mem["open_files"][n] for n in ("start", "middle", "end")), mem["open_files_peak"]],
                ["log bytes", *(mem["log_bytes"][n] for n in ("start", "middle", "end")), ""],
            ],
        ),
        "Requests by kind (latency includes the deliberate delays of the slow kinds):",
        "",
        markdown_table(
            ["kind", "n", "statuses", "unexpected", "p50 ms", "p99 ms", "max ms"],
            [
                [
                    kind,
                    v["n"],
                    ", ".join(f"{s}: {n}" for s, n in v["statuses"].items()),
                    v["unexpected"],
                    num(v["p50_ms"]),
                    num(v["p99_ms"]),
                    num(v["max_ms"]),
                ]
                for kind, v in report["by_kind"].items()
            ],
        ),
    ]
    if report["unexpected_examples"]:
        lines += ["Unexpected outcomes (first 10):", ""]
        lines += [f"- {e['kind']}: {e['problem']}" for e in report["unexpected_examples"]]
    return "\n".join(lines) + "\n"


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "logical_cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-seconds", type=float, default=1200.0, help="stop sending new requests after this")
    p.add_argument("--server-threads", type=int, default=1, help="the server's onnxruntime intra-op threads")
    p.add_argument(
        "--warmup",
        type=int,
        default=640,
        help="POST /recommend requests (at full concurrency) before the start snapshot, not counted",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--server-nofile",
        type=int,
        default=1024,
        help="the server's open-file limit (it derives its connection limit from it); 0: this process's",
    )
    p.add_argument(
        "--flood",
        type=float,
        default=1.5,
        help="connections the flood holds open, as a multiple of the server's connection limit (0: no flood)",
    )
    p.add_argument(
        "--flood-rate",
        type=float,
        default=2000.0,
        help="new connections the flood opens a second at most (replacing those the server closes)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a short check that the soak works: 600 requests at concurrency 8, 32 warm-up requests, the report "
        "in /tmp/laser-soak-smoke.json unless --out is given (never bench/results: not a measurement)",
    )
    p.add_argument("--bundle", type=Path, default=None, help="serve this bundle (default: build the tiny one)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the JSON report (default bench/results/soak.json); the Markdown one is written beside it (.md)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        given = set(argv if argv is not None else sys.argv[1:])
        for flag, value in (("--requests", 600), ("--concurrency", 8), ("--warmup", 32)):
            if flag not in given:
                setattr(args, flag[2:], value)
        args.out = args.out or Path(tempfile.gettempdir()) / "laser-soak-smoke.json"
    args.out = args.out or ROOT / "bench" / "results" / "soak.json"
    return args


def _raise_own_file_limit(need: int) -> None:
    """The flood holds many sockets in this process: its soft open-file limit up to the hard one if needed."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(need, hard), hard))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    command = "python bench/soak.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="laser-soak-") as tmp:
        bundle = args.bundle
        if bundle is None:
            t0 = time.perf_counter()
            print("building the tiny bundle ...", file=sys.stderr)
            bundle = build_tiny_bundle(Path(tmp) / "bundle", seed=args.seed)
            print(f"  built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        from laser_core.bundle import load_manifest

        manifest = load_manifest(bundle)
        import pandas as pd

        item_ids = pd.read_parquet(bundle / manifest.catalogue.file)["item_id"].astype(str).tolist()
        server = ServerProcess(bundle_server_command(bundle, args.server_threads), nofile=args.server_nofile or None)
        _raise_own_file_limit(math.ceil(args.flood * server.max_connections) + 4 * args.concurrency + 256)
        try:
            print(
                f"server pid {server.pid} on {server.host}:{server.port}; {args.requests} requests ...", file=sys.stderr
            )
            report = run_soak(
                server,
                item_ids,
                min(20, len(item_ids)),
                args.requests,
                args.concurrency,
                args.max_seconds,
                seed=args.seed,
                warmup=args.warmup,
                progress=True,
                flood=args.flood,
                flood_rate=args.flood_rate,
            )
        finally:
            exit_status = server.stop()
            server.cleanup()
    report = {
        "command": command.strip(),
        "machine": machine,
        "config": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_seconds": args.max_seconds,
            "server_threads": args.server_threads,
            "warmup": args.warmup,
            "seed": args.seed,
            "smoke": args.smoke,
            "server_nofile": args.server_nofile,
            "flood": args.flood,
            "flood_rate": args.flood_rate,
            "stall_timeout_s": STALL_TIMEOUT_S,
            "bundle": "tiny (built in a temporary folder)" if args.bundle is None else str(args.bundle),
            "model_version": manifest.metadata.get("model_version"),
            "n_items": manifest.n_items,
            "mix": MIX,
            "expected": {k: sorted(v, key=str) for k, v in EXPECTED.items()},
        },
        **report,
        "server_exit_status": exit_status,
    }
    report["passed"] = report["passed"] and exit_status == 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf8")
    md = markdown(report)
    args.out.with_suffix(".md").write_text(md, encoding="utf8")
    print(md)
    return 0 if report["passed"] and report["goals"]["all_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
