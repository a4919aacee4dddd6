"""Soak test of the HTTP service (laser_core/service.py) on 127.0.0.1, with hostile and slow clients mixed in.

    python bench/soak.py                                  # 10,000 requests at concurrency 32 (the full soak)
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
clients on their own sockets: bodies sent in pieces, responses read late in 16-byte pieces, and clients that hang
up mid-body. (uvicorn has no timeout for a client that stalls mid-request; a reverse proxy in front of the
service enforces one, so stalled clients are not part of the mix.) Every kind has the statuses it must get;
anything else is counted as unexpected. A request is
*answered* when a whole HTTP response came back (the hang-ups expect none).

Reported (``bench/results/soak.json`` and ``.md``): requests served, statuses overall and per kind, 5xx count,
unanswered and unexpected counts (with examples), latency p50/p90/p99/max per kind (``recommend`` is the
service's real latency; the slow kinds include their deliberate delays), throughput, the server's RSS, threads
and open files at start (after a warm-up), middle (half the requests done) and end, and whether its log holds
a traceback. ``passed`` is true when there is no 5xx, no unanswered or unexpected request, and no traceback.
Exit status 1 when not passed. Latencies are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import random
import re
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
}
SLOW_KINDS = ("slow_sender", "slow_reader", "hang_up")
KEEP_ALIVE_S = 5.0  # uvicorn's default keep-alive timeout: an idle connection is closed by the server after it
CLIENT_TIMEOUT_S = 60.0
_SERVING_LINE = re.compile(r"serving model .* on http://([^:\s]+):(\d+)")


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

    def __init__(self, command: Sequence[str], start_timeout: float = 180.0, cwd: Path = ROOT) -> None:
        self._log = tempfile.NamedTemporaryFile(prefix="laser-soak-server-", suffix=".log", delete=False)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(list(command), cwd=str(cwd), stdout=subprocess.DEVNULL, stderr=self._log, env=env)
        self.pid = self.proc.pid
        deadline = time.monotonic() + start_timeout
        while True:
            match = _SERVING_LINE.search(self.log())
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the server did not start (exit status {self.proc.returncode}):\n{self.log()[-3000:]}"
                )
            time.sleep(0.1)

    def log(self) -> str:
        return Path(self._log.name).read_text(encoding="utf8", errors="replace")

    def status(self) -> dict[str, int]:
        return _proc_status(self.pid)

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
    """``laser serve`` (as ``python -m laser_cli.main serve``) on a free port of 127.0.0.1."""
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
) -> dict:
    """Drive ``server`` with ``requests`` requests from ``concurrency`` threads; the report (see the module doc)."""
    work = Workload(server.host, server.port, item_ids, max_k)

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
            status = {**server.status(), "t_s": round(time.monotonic() - t0, 2), "requests_done": n_done}
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
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic()) + work.client_timeout + 5)
    wall = time.monotonic() - t0
    done.set()
    watcher.join(timeout=5)
    time.sleep(1.0)  # let the server finish closing the last connections
    snapshots.setdefault("middle", samples[len(samples) // 2] if samples else {})
    snapshots["end"] = {**server.status(), "requests_done": len(outcomes)}
    return summarize(outcomes, requests, wall, snapshots, samples, server.log(), any(t.is_alive() for t in threads))


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
            "samples": samples[:: max(1, len(samples) // 200)],
        },
        "server_log": {
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
        "Server memory (RSS, MiB) and resources: start (after a warm-up) / middle / end; growth start to end "
        f"{mem['growth_start_to_end_mib']} MiB, middle to end {mem['growth_middle_to_end_mib']} MiB.",
        "",
        markdown_table(
            ["", "start", "middle", "end", "peak"],
            [
                ["RSS MiB", *(num(mem["rss_mib"][n]) for n in ("start", "middle", "end", "peak"))],
                ["threads", *(mem["threads"][n] for n in ("start", "middle", "end")), ""],
                ["open files", *(mem["open_files"][n] for n in ("start", "middle", "end")), ""],
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
    p.add_argument("--bundle", type=Path, default=None, help="serve this bundle (default: build the tiny one)")
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results" / "soak.json",
        help="the JSON report; the Markdown one is written beside it (.md)",
    )
    return p.parse_args(argv)


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
        from laser_core.bundle import read_manifest

        manifest = read_manifest(bundle)
        import pandas as pd

        item_ids = pd.read_parquet(bundle / manifest["catalogue"]["file"])["item_id"].astype(str).tolist()
        server = ServerProcess(bundle_server_command(bundle, args.server_threads))
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
            "bundle": "tiny (built in a temporary folder)" if args.bundle is None else str(args.bundle),
            "model_version": manifest["metadata"].get("model_version"),
            "n_items": manifest["n_items"],
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
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
