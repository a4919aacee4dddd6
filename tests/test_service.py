"""The HTTP JSON service (laser_core/service.py) over loopback with a real HTTP client.

The recommender here is a real one, not a mock: cosine similarity between the mean of the history's item
embeddings and a seeded random item table, so every ranking can be checked against a numpy ground truth.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from laser_core.service import LaserHTTPServer, ListenError, RecommenderLike, make_server

N_ITEMS, DIM = 400, 24


@dataclass
class Ranked:
    item_id: str
    title: str
    score: float


@dataclass
class Result:
    items: list[Ranked]
    dropped: list[str] = field(default_factory=list)


class CosineRecommender:
    """Cosine top-k over a seeded random table; returns a dataclass or (``as_dict``) a plain dict."""

    def __init__(self, n_items: int = N_ITEMS, dim: int = DIM, seed: int = 0, as_dict: bool = False) -> None:
        rng = np.random.default_rng(seed)
        table = rng.standard_normal((n_items, dim)).astype(np.float32)
        self.table = table / np.linalg.norm(table, axis=1, keepdims=True)
        self.ids = [f"item{i}" for i in range(n_items)]
        self.index = {item: i for i, item in enumerate(self.ids)}
        self.model_version = f"cosine-seed{seed}"
        self.n_items = n_items
        self.as_dict = as_dict

    def recommend(self, history: list[str], k: int | None = None, exclude_history: bool = False):
        known = [self.index[i] for i in history if i in self.index]
        dropped = [i for i in history if i not in self.index]
        if not known:
            raise ValueError(f"none of the {len(history)} history ids is in the catalogue")
        user = self.table[known].mean(axis=0)
        scores = self.table @ (user / np.linalg.norm(user))
        if exclude_history:
            scores[known] = -np.inf
        order = np.argsort(-scores, kind="stable")[: k or 10]
        order = order[np.isfinite(scores[order])]
        items = [Ranked(self.ids[j], f"Title {j}", float(scores[j])) for j in order]
        if self.as_dict:
            return {"items": [vars(it) for it in items], "dropped": dropped}
        return Result(items, dropped)


def ground_truth(rec: CosineRecommender, history: list[str], k: int, exclude: bool = False) -> list[str]:
    """The expected ranking, computed independently with float64 and a lexsort."""
    rows = [int(i[4:]) for i in history if i in rec.index]
    table = rec.table.astype(np.float64)
    user = table[rows].mean(axis=0)
    scores = table @ user / np.linalg.norm(user)
    if exclude:
        scores[rows] = -np.inf
    order = np.lexsort((np.arange(len(scores)), -scores))
    return [f"item{j}" for j in order[:k] if np.isfinite(scores[j])]


def ranking_error(rec: CosineRecommender, history: list[str], k: int, exclude: bool, got: list[str]) -> str | None:
    """None when ``got`` is a correct top-k up to the order of exact ties (two history items tie by symmetry)."""
    want = ground_truth(rec, history, k, exclude)
    if got == want:
        return None
    rows = [int(i[4:]) for i in history if i in rec.index]
    table = rec.table.astype(np.float64)
    user = table[rows].mean(axis=0)
    scores = table @ user / np.linalg.norm(user)
    got_scores = np.array([scores[int(i[4:])] for i in got])
    want_scores = np.array([scores[int(i[4:])] for i in want])
    excluded = exclude and bool(set(got) & set(history))
    if len(got) != len(want) or len(set(got)) != len(got) or excluded or not np.allclose(got_scores, want_scores,
                                                                                         atol=1e-6):
        return f"{history} k={k} exclude={exclude}: got {got}, want {want}"
    return None


class Serving:
    def __init__(self, recommender, **kwargs) -> None:
        self.recommender = recommender
        self.server: LaserHTTPServer = make_server(recommender, "127.0.0.1", 0, **kwargs)
        self.host, self.port = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=30)

    def request(self, method: str, path: str, body: bytes | str | dict | list | None = None,
                headers: dict[str, str] | None = None, conn: http.client.HTTPConnection | None = None):
        """(status, headers, parsed JSON body) for one request."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        own = conn is None
        conn = conn or self.conn()
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, resp.headers, json.loads(raw) if raw else None
        finally:
            if own:
                conn.close()


@pytest.fixture(scope="module")
def svc() -> Iterator[Serving]:
    s = Serving(CosineRecommender(), max_k=50, max_body_bytes=64 * 1024)
    yield s
    s.close()


def test_protocol_is_satisfied():
    assert isinstance(CosineRecommender(), RecommenderLike)


def test_recommend_matches_numpy_ground_truth(svc):
    history = ["item3", "item17", "item250"]
    status, headers, body = svc.request("POST", "/recommend", {"history": history, "k": 7})
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json")
    assert headers["X-Model-Version"] == "cosine-seed0" == body["model_version"]
    assert [it["item_id"] for it in body["items"]] == ground_truth(svc.recommender, history, 7)
    assert [it["rank"] for it in body["items"]] == list(range(1, 8))
    assert body["items"][0]["title"] == f"Title {body['items'][0]['item_id'][4:]}"
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert body["dropped"] == []


def test_default_k_exclude_history_and_dropped_ids(svc):
    history = ["item5", "nope-1", "item9", "nope-2"]
    status, _, body = svc.request("POST", "/recommend", {"history": history, "exclude_history": True})
    assert status == 200, body
    ids = [it["item_id"] for it in body["items"]]
    assert len(ids) == 10  # the default k
    assert ids == ground_truth(svc.recommender, history, 10, exclude=True)
    assert not {"item5", "item9"} & set(ids)
    assert body["dropped"] == ["nope-1", "nope-2"]
    # without exclusion the history's own items rank at the top for a mean-of-history user
    _, _, plain = svc.request("POST", "/recommend", {"history": ["item5"], "k": 1})
    assert plain["items"][0]["item_id"] == "item5"


def test_dict_results_are_accepted():
    s = Serving(CosineRecommender(seed=3, as_dict=True))
    try:
        status, headers, body = s.request("POST", "/recommend", {"history": ["item1", "item2"], "k": 4})
        assert status == 200, body
        assert headers["X-Model-Version"] == "cosine-seed3"
        got = [it["item_id"] for it in body["items"]]
        assert ranking_error(s.recommender, ["item1", "item2"], 4, False, got) is None
    finally:
        s.close()


@pytest.mark.parametrize("k, ok", [(1, True), (50, True), (0, False), (-3, False), (51, False)])
def test_k_bounds(svc, k, ok):
    status, _, body = svc.request("POST", "/recommend", {"history": ["item1"], "k": k})
    if ok:
        assert status == 200 and len(body["items"]) == k
    else:
        assert status == 400
        assert body["error"] == "validation_error"
        assert body["message"].startswith("k: ")
        assert ("at most 50" in body["message"]) if k > 50 else ("greater than or equal to 1" in body["message"])
        assert body["details"][0]["field"] == "k"


def test_k_is_capped_at_the_catalogue_size():
    s = Serving(CosineRecommender(n_items=20), max_k=100)
    try:
        status, _, body = s.request("POST", "/recommend", {"history": ["item1"], "k": 21})
        assert status == 400 and "at most 20 (the catalogue size)" in body["message"]
        assert s.request("POST", "/recommend", {"history": ["item1"], "k": 20})[0] == 200
    finally:
        s.close()


@pytest.mark.parametrize("payload, field_name, problem", [
    ({}, "history", "Field required"),
    ({"k": 3}, "history", "Field required"),
    ({"history": []}, "history", "at least 1 item"),
    ({"history": "item1"}, "history", "valid list"),
    ({"history": ["item1", 7]}, "history[1]", "valid string"),
    ({"history": [f"item{i % N_ITEMS}" for i in range(1001)]}, "history", "at most 1000 items"),
    ({"history": ["item1"], "k": "5"}, "k", "valid integer"),
    ({"history": ["item1"], "k": 2.5}, "k", "valid integer"),
    ({"history": ["item1"], "k": True}, "k", "valid integer"),
    ({"history": ["item1"], "k": None}, "k", "valid integer"),
    ({"history": ["item1"], "exclude_history": "yes"}, "exclude_history", "valid boolean"),
    ({"history": ["item1"], "histroy": ["item2"]}, "histroy", "Extra inputs are not permitted"),
    ([{"history": ["item1"]}], "body", "expected a JSON object, got a JSON array"),
    ("\"item1\"", "body", "expected a JSON object, got a JSON string"),
])
def test_validation_errors_name_the_field_and_problem(svc, payload, field_name, problem):
    status, headers, body = svc.request("POST", "/recommend", payload)
    assert status == 400, body
    assert body["error"] == "validation_error"
    assert headers["X-Model-Version"] == body["model_version"] == "cosine-seed0"
    assert any(d["field"] == field_name and problem in d["problem"] for d in body["details"]), body
    assert f"{field_name}: " in body["message"] and problem in body["message"]


@pytest.mark.parametrize("raw, fragment", [
    ('{"history": ["item1"', "not valid JSON"),
    ("", "not valid JSON"),
    ('{"history": ["item1"], "k": NaN}', "NaN is not allowed"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_malformed_json(svc, raw, fragment):
    status, _, body = svc.request("POST", "/recommend", raw)
    assert status == 400
    assert body["error"] == "malformed_json"
    assert fragment in body["message"]


def test_unknown_path_and_wrong_method(svc):
    status, _, body = svc.request("GET", "/nope")
    assert status == 404 and body["error"] == "not_found" and "/nope" in body["message"]
    status, _, body = svc.request("POST", "/recommendations", {"history": ["item1"]})
    assert status == 404
    status, headers, body = svc.request("GET", "/recommend")
    assert status == 405 and headers["Allow"] == "POST" and "accepts POST" in body["message"]
    status, headers, _ = svc.request("DELETE", "/health")
    assert status == 405 and headers["Allow"] == "GET"
    status, _, body = svc.request("BREW", "/recommend")  # a method http.server has no handler for
    assert status == 405 and "BREW" in body["message"]


def test_errors_keep_the_connection_usable(svc):
    conn = svc.conn()
    try:
        assert svc.request("POST", "/nope", {"history": ["x"] * 50}, conn=conn)[0] == 404
        assert svc.request("POST", "/recommend", "{oops", conn=conn)[0] == 400
        assert svc.request("POST", "/recommend", {"history": ["zzz"]}, conn=conn)[0] == 422
        status, _, body = svc.request("POST", "/recommend", {"history": ["item4"], "k": 3}, conn=conn)
        assert status == 200 and [i["item_id"] for i in body["items"]] == ground_truth(svc.recommender, ["item4"], 3)
    finally:
        conn.close()


def test_oversized_body_is_refused(svc):
    big = {"history": [f"item{i % N_ITEMS}" for i in range(900)], "pad": "x" * 70_000}
    status, headers, body = svc.request("POST", "/recommend", big)
    assert status == 413
    assert body["error"] == "payload_too_large" and "limit is 65536 bytes" in body["message"]
    assert headers["Connection"] == "close"


def test_oversized_declared_length_is_refused_before_reading():
    s = Serving(CosineRecommender(), max_body_bytes=1024)
    try:
        with socket.create_connection((s.host, s.port), timeout=30) as sock:
            sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000000000\r\n\r\n")
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            assert resp.status == 413
            assert "1000000000 bytes" in json.loads(resp.read())["message"]
    finally:
        s.close()


def test_missing_content_length_and_truncated_body(svc):
    with socket.create_connection((svc.host, svc.port), timeout=30) as sock:
        sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["message"]
    with socket.create_connection((svc.host, svc.port), timeout=30) as sock:
        sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"history\"")
        sock.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 400 and "ended after 10 of 100 bytes" in json.loads(resp.read())["message"]
    with socket.create_connection((svc.host, svc.port), timeout=30) as sock:
        sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n")
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 400 and "invalid Content-Length" in json.loads(resp.read())["message"]


def _raw_exchange(s: Serving, data: bytes, hang: float = 0.0) -> tuple[int, dict, float]:
    """Send ``data`` on a fresh socket, wait ``hang`` s, then read one response: (status, body, seconds)."""
    start = time.monotonic()
    with socket.create_connection((s.host, s.port), timeout=30) as sock:
        sock.sendall(data)
        time.sleep(hang)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, json.loads(resp.read()), time.monotonic() - start


@pytest.mark.parametrize("depth", [2_000, 8_000])  # the svc body limit is 64 KiB
def test_deeply_nested_json_is_a_400_not_a_500(svc, depth):
    conn = svc.conn()
    try:
        for body in ('{"history": ' + "[" * depth + "]" * depth + "}", "{\"a\": " * depth + "1" + "}" * depth):
            status, _, answer = svc.request("POST", "/recommend", body, conn=conn)
            assert status == 400 and answer["error"] == "malformed_json", answer
            assert "nested too deeply" in answer["message"]
        assert svc.request("POST", "/recommend", {"history": ["item2"]}, conn=conn)[0] == 200  # still usable
    finally:
        conn.close()


def test_a_client_that_stalls_mid_request_gets_a_408():
    """The request timeout is the server's setting (0.5 s here; 30 s by default): a stalled body or stalled
    headers get a 408 JSON answer (not a 500), and the connection is closed."""
    s = Serving(CosineRecommender(), request_timeout=0.5)
    try:
        body = json.dumps({"history": ["item1", "item2"]}).encode()
        head = f"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        status, answer, seconds = _raw_exchange(s, head + body[:10])
        assert status == 408 and answer["error"] == "request_timeout", answer
        assert f"{len(body)} bytes" in answer["message"] and "0.5 s" in answer["message"]
        assert 0.4 < seconds < 10
        status, answer, _ = _raw_exchange(s, b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Le")
        assert status == 408 and "no complete request headers within 0.5 s" in answer["message"]
        assert s.request("POST", "/recommend", {"history": ["item1"]})[0] == 200
    finally:
        s.close()
    with pytest.raises(ValueError, match="request_timeout must be > 0"):
        make_server(CosineRecommender(), request_timeout=0)


def test_clients_that_hang_up_or_reset_are_not_server_errors(capsys, caplog):
    """A client gone mid-body (its error answer cannot be written) or mid-answer: no traceback on stderr (where
    socketserver prints unhandled ones), no error log, and the server keeps serving."""
    s = Serving(CosineRecommender())
    try:
        body = json.dumps({"history": ["item1", "item2", "item3"]}).encode()
        head = f"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        with caplog.at_level(logging.INFO, logger="laser.service"):
            for _ in range(20):
                with socket.create_connection((s.host, s.port), timeout=30) as sock:
                    sock.sendall(head + body[:12])  # then close: the 400 goes to a closed socket
                with socket.create_connection((s.host, s.port), timeout=30) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    sock.sendall(head + body)  # then reset without reading the answer
            time.sleep(0.5)
            assert s.request("GET", "/health")[0] == 200
        assert "Traceback" not in capsys.readouterr().err
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        s.close()


def test_lone_surrogates_and_a_broken_request_target_are_client_errors(svc):
    """Ids that are not valid Unicode are echoed as JSON escapes (the body stays UTF-8), never a 500."""
    status, _, body = svc.request("POST", "/recommend", '{"history": ["item1", "\\udcff"], "k": 2}')
    assert status == 200 and body["dropped"] == ["\udcff"]
    status, _, body = svc.request("POST", "/recommend", '{"history": ["\\ud800"]}')
    assert status == 422 and body["error"] == "unprocessable_history"
    status, _, body = svc.request("POST", "/recommend", '{"history": ["item1"], "\\ud800": 1}')
    assert status == 400 and body["error"] == "validation_error"
    status, answer, _ = _raw_exchange(svc, b"GET http://[::1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400 and "malformed request target" in answer["message"]


def test_a_busy_port_is_one_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}: .*in use"):
            make_server(CosineRecommender(), "127.0.0.1", port)


def test_value_error_becomes_422_with_its_message(svc):
    status, headers, body = svc.request("POST", "/recommend", {"history": ["unknown-a", "unknown-b"]})
    assert status == 422
    assert body["error"] == "unprocessable_history"
    assert body["message"] == "none of the 2 history ids is in the catalogue"
    assert headers["X-Model-Version"] == "cosine-seed0"


class Exploding(CosineRecommender):
    def recommend(self, history, k=None, exclude_history=False):
        raise RuntimeError("index file vanished")


def test_unexpected_error_is_a_short_500_and_logged(caplog):
    s = Serving(Exploding())
    try:
        with caplog.at_level(logging.ERROR, logger="laser.service"):
            status, _, body = s.request("POST", "/recommend", {"history": ["item1"]})
        assert status == 500
        assert body["error"] == "internal_error"
        assert "Traceback" not in body["message"] and "index file vanished" not in body["message"]
        assert any(r.exc_info and "index file vanished" in str(r.exc_info[1]) for r in caplog.records)
        assert s.request("GET", "/health")[0] == 200  # the server is still up
    finally:
        s.close()


def test_health(svc):
    status, headers, body = svc.request("GET", "/health")
    assert status == 200
    assert body == {"status": "ok", "model_version": "cosine-seed0", "n_items": N_ITEMS}
    assert headers["X-Model-Version"] == "cosine-seed0"
    assert svc.request("GET", "/health?verbose=1")[0] == 200


def test_concurrent_clients_all_get_their_own_correct_answer(svc):
    n_threads, per_thread = 16, 10
    rng = np.random.default_rng(42)
    jobs = [[([f"item{j}" for j in rng.choice(N_ITEMS, size=int(rng.integers(1, 12)), replace=False)],
              int(rng.integers(1, 30)), bool(rng.integers(0, 2))) for _ in range(per_thread)]
            for _ in range(n_threads)]
    failures: list[str] = []
    start = threading.Barrier(n_threads)

    def client(my_jobs):
        conn = svc.conn()  # one keep-alive connection per client thread
        try:
            start.wait()
            for history, k, exclude in my_jobs:
                status, _, body = svc.request("POST", "/recommend",
                                              {"history": history, "k": k, "exclude_history": exclude}, conn=conn)
                if status != 200:
                    failures.append(f"{history} k={k} exclude={exclude}: HTTP {status} {body}")
                    continue
                got = [it["item_id"] for it in body["items"]]
                error = ranking_error(svc.recommender, history, k, exclude, got)
                if error:
                    failures.append(error)
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(jobs[t],)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_health(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early ({proc.returncode}): {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                return json.loads(resp.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_blocks_and_shuts_down_cleanly_on_ctrl_c_or_sigterm(sig):
    port = _free_port()
    code = ("import logging, sys; sys.path.insert(0, 'tests'); logging.basicConfig(level=logging.INFO)\n"
            "from test_service import CosineRecommender\nfrom laser_core.service import serve\n"
            f"serve(CosineRecommender(seed=5), '127.0.0.1', {port})\nprint('returned', flush=True)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for_health(port, proc)["model_version"] == "cosine-seed5"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "returned" in stdout and "shutting down" in stderr and "Traceback" not in stderr


def test_make_server_rejects_objects_that_are_not_recommenders():
    with pytest.raises(TypeError, match="has no 'recommend'"):
        make_server(object())


# ------------------------------------------------------------------------------------- a real exported bundle
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A bundle from laser_core.export.export_bundle (tiny random Llama backbone, untrained BERT4Rec + M-Former),
    its torch reference model and item table."""
    if importlib.util.find_spec("laser_core.serving") is None:
        pytest.skip("laser_core.serving (Recommender over an exported bundle) is not in this checkout")
    import torch

    from laser_core.data import load_dataset
    from laser_core.data.text import TextConfig
    from laser_core.export import export_bundle, reference_model
    from laser_core.llm import BackboneConfig
    from laser_core.mformer import MFormerConfig
    from laser_core.model import BiTuneConfig, LaserSpec, LaserWeights, build_laser
    from laser_core.sr import SRConfig, build_model

    ds = load_dataset({"synthetic": {"n_users": 120, "n_items": 40, "n_user_types": 4, "seed": 3}})
    torch.manual_seed(0)
    sr = build_model(SRConfig(model="bert4rec", hidden_size=16, max_len=8), ds.n_items).eval()
    mformer = MFormerConfig(n_experts=2, n_query=4, width=32, n_layers=2, n_heads=2, dropout=0.0)
    spec = LaserSpec(bitune=BiTuneConfig(mformer=mformer), text=TextConfig(history_len=4),
                     backbone=BackboneConfig(name="tiny-random-llama", quantization="none"))
    model = build_laser(spec, ds.items, sr)
    with torch.no_grad():  # move the suffix off its EOS initialisation so users differ
        model.suffix.add_(0.1 * torch.randn_like(model.suffix))
    weights = LaserWeights(spec=spec, state={n: t.detach().clone() for n, t in model.state_dict().items()})
    ref = reference_model(weights, sr, ds.items)
    with torch.no_grad():
        table = ref.embed_items(range(ds.n_items))
    out = tmp_path_factory.mktemp("service-export") / "bundle"
    export_bundle(weights, sr, ds.items, table, out, k=10, metadata={"model_version": "svc-test-1"})
    return out, ds, ref, table


@pytest.mark.slow  # the export (torch.export of the tiny backbone) takes minutes on 2 cores
def test_serves_a_real_exported_bundle(exported):
    import torch

    from laser_core.serving import Recommender

    bundle, ds, ref, table = exported
    rec = Recommender.load(bundle)
    assert isinstance(rec, RecommenderLike)
    ids = ds.items["item_id"].astype(str).tolist()
    s = Serving(rec)
    try:
        status, headers, body = s.request("GET", "/health")
        assert status == 200 and body == {"status": "ok", "model_version": "svc-test-1", "n_items": 40}
        assert headers["X-Model-Version"] == "svc-test-1"

        rows = [3, 17, 8]
        history = [ids[r] for r in rows[:2]] + ["not-an-item"] + [ids[rows[2]]]
        status, headers, body = s.request("POST", "/recommend", {"history": history, "k": 5})
        assert status == 200, body
        assert headers["X-Model-Version"] == body["model_version"] == "svc-test-1"
        assert body["dropped"] == ["not-an-item"]
        direct = rec.recommend(history, k=5)
        assert [it["item_id"] for it in body["items"]] == [it.item_id for it in direct.items]
        assert [it["rank"] for it in body["items"]] == [1, 2, 3, 4, 5]
        assert np.allclose([it["score"] for it in body["items"]], [it.score for it in direct.items])
        assert body["items"][0]["title"] == direct.items[0].title
        # the torch model's cosine top-5 for the same history (scores to the ONNX export's float tolerance)
        with torch.no_grad():
            user = ref([rows])[0][0].numpy()
        cos = (table.numpy() / np.linalg.norm(table.numpy(), axis=1, keepdims=True)) @ (user / np.linalg.norm(user))
        want = np.sort(cos)[::-1][:5]
        got = cos[[ids.index(it["item_id"]) for it in body["items"]]]
        assert np.allclose(got, want, atol=1e-4)

        # k beyond the scorer's baked-in top-10, with the history excluded (the recommender's full ranking)
        status, _, body = s.request("POST", "/recommend", {"history": history, "k": 15, "exclude_history": True})
        assert status == 200 and len(body["items"]) == 15
        assert not {ids[r] for r in rows} & {it["item_id"] for it in body["items"]}

        status, _, body = s.request("POST", "/recommend", {"history": ["nope", "nada"]})
        assert status == 422 and body["error"] == "unprocessable_history"
        assert "none of its 2 item id(s) is in the catalogue" in body["message"]
        status, _, body = s.request("POST", "/recommend", {"history": history, "k": 41})
        assert status == 400 and "at most 40 (the catalogue size)" in body["message"]
    finally:
        s.close()

    # the command-line entry point over the same bundle: serves, then exits cleanly on Ctrl-C
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "laser_core.service", "--bundle", str(bundle), "--port",
                             str(port), "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for_health(port, proc) == {"status": "ok", "model_version": "svc-test-1", "n_items": 40}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/recommend", method="POST",
                                     data=json.dumps({"history": history, "k": 5}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert [it["item_id"] for it in json.loads(resp.read())["items"]] == [it.item_id for it in direct.items]
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "serving model svc-test-1" in stderr and "shutting down" in stderr


# ---------------------------------------------------------------------------------------------------- soak
def _soak():
    """bench/soak.py as a module (bench/ is not a package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("laser_bench_soak", os.path.join(root, "bench", "soak.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _check_soak(report: dict, n: int) -> None:
    assert report["requests"]["sent"] == n and report["requests"]["unanswered"] == 0, report["requests"]
    assert report["errors_5xx"] == 0 and report["requests"]["unexpected"] == 0, report["unexpected_examples"]
    assert report["server_log"]["tracebacks"] == 0, report["first_traceback"]
    assert not report["stuck_clients"] and report["passed"]
    assert report["by_kind"]["stall_body"]["statuses"] == {"408": report["by_kind"]["stall_body"]["n"]}
    if sys.platform.startswith("linux"):
        assert report["memory"]["rss_mib"]["end"] > 0 and report["memory"]["threads"]["end"] >= 1


def test_soak_every_request_is_answered_and_none_is_a_5xx():
    """bench/soak.py in small: 300 requests at concurrency 8, every kind of client of the full soak (stalled
    bodies and headers, slow senders and readers, hang-ups, malformed and deeply nested JSON ...), against a
    server process (the cosine recommender, 0.5 s request timeout)."""
    soak = _soak()
    code = ("import logging, sys; sys.path.insert(0, 'tests'); logging.basicConfig(level=logging.INFO)\n"
            "from test_service import CosineRecommender\nfrom laser_core.service import serve\n"
            "serve(CosineRecommender(seed=5), '127.0.0.1', 0, request_timeout=0.5)\n")
    server = soak.ServerProcess([sys.executable, "-c", code], start_timeout=120)
    try:
        report = soak.run_soak(server, [f"item{i}" for i in range(N_ITEMS)], 20, requests=300, concurrency=8,
                               request_timeout=0.5, max_seconds=240, warmup=16)
    finally:
        exit_status = server.stop()
        server.cleanup()
    assert set(report["by_kind"]) == set(soak.MIX)  # every kind ran at least once
    _check_soak(report, 300)
    assert exit_status == 0


@pytest.mark.slow  # needs the exported bundle (minutes on 2 cores)
def test_soak_against_a_real_bundle_served_by_the_module_entry_point(exported):
    soak = _soak()
    bundle, ds, _, _ = exported
    server = soak.ServerProcess(soak.bundle_server_command(bundle, request_timeout=0.5, threads=1))
    try:
        report = soak.run_soak(server, ds.items["item_id"].astype(str).tolist(), 20, requests=200, concurrency=8,
                               request_timeout=0.5, max_seconds=300, warmup=16)
    finally:
        exit_status = server.stop()
        server.cleanup()
    _check_soak(report, 200)
    assert exit_status == 0
