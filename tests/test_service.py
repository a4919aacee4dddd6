"""The HTTP JSON service (laser_core/service.py): the FastAPI app through Starlette's TestClient, and the real
uvicorn server in a subprocess (startup, a request, readiness, graceful shutdown on SIGINT and SIGTERM).

The recommender here is a real one, not a mock: cosine similarity between the mean of the history's item
embeddings and a seeded random item table, so every ranking can be checked against a numpy ground truth.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest
from fastapi.testclient import TestClient

from laser_core.service import ListenError, RecommenderLike, ServerSettings, bind, build_server, create_app

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
        self.item_ids = self.ids
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
    if (
        len(got) != len(want)
        or len(set(got)) != len(got)
        or excluded
        or not np.allclose(got_scores, want_scores, atol=1e-6)
    ):
        return f"{history} k={k} exclude={exclude}: got {got}, want {want}"
    return None


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def client(recommender, **kwargs) -> TestClient:
    """A TestClient over ``create_app``; enter it (``with``) to run the app's startup (its warm-up query, after
    which ``/ready`` turns 200: :func:`wait_ready`)."""
    return TestClient(create_app(recommender, **kwargs), raise_server_exceptions=False)


def wait_ready(get, timeout: float = 60.0):
    """Poll ``get("/ready")`` (a TestClient's or an httpx client's get) until it is 200 (the warm-up query ran)."""
    deadline = time.monotonic() + timeout
    while (resp := get("/ready")).status_code != 200:
        assert resp.status_code == 503 and "warm-up" in resp.json()["message"], resp.text
        assert time.monotonic() < deadline, resp.text
        time.sleep(0.02)
    return resp


@pytest.fixture(scope="module")
def svc() -> Iterator[TestClient]:
    with client(CosineRecommender(), max_k=50, max_body_bytes=64 * 1024) as c:
        c.recommender = c.app.state.recommender
        yield c


def post(c: TestClient, body, **kwargs):
    """POST /recommend: a dict or list is sent as JSON, str/bytes as they are (Content-Type: application/json)."""
    if isinstance(body, (dict, list)):
        return c.post("/recommend", json=body, **kwargs)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return c.post("/recommend", content=body, headers=headers, **kwargs)


def test_protocol_is_satisfied():
    assert isinstance(CosineRecommender(), RecommenderLike)


def test_recommend_matches_numpy_ground_truth(svc):
    history = ["item3", "item17", "item250"]
    resp = post(svc, {"history": history, "k": 7})
    body = resp.json()
    assert resp.status_code == 200, body
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["X-Model-Version"] == "cosine-seed0" == body["model_version"]
    assert [it["item_id"] for it in body["items"]] == ground_truth(svc.recommender, history, 7)
    assert [it["rank"] for it in body["items"]] == list(range(1, 8))
    assert body["items"][0]["title"] == f"Title {body['items'][0]['item_id'][4:]}"
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert body["dropped"] == [] and "fallback" not in body


def test_default_k_exclude_history_and_dropped_ids(svc):
    history = ["item5", "nope-1", "item9", "nope-2"]
    resp = post(svc, {"history": history, "exclude_history": True})
    body = resp.json()
    assert resp.status_code == 200, body
    ids = [it["item_id"] for it in body["items"]]
    assert len(ids) == 10  # the default k
    assert ids == ground_truth(svc.recommender, history, 10, exclude=True)
    assert not {"item5", "item9"} & set(ids)
    assert body["dropped"] == ["nope-1", "nope-2"]
    # without exclusion the history's own items rank at the top for a mean-of-history user
    assert post(svc, {"history": ["item5"], "k": 1}).json()["items"][0]["item_id"] == "item5"


def test_dict_results_are_accepted_and_a_body_without_content_type_is_json():
    with client(CosineRecommender(seed=3, as_dict=True)) as c:
        resp = c.post("/recommend", content=json.dumps({"history": ["item1", "item2"], "k": 4}))
        assert resp.status_code == 200, resp.text
        assert resp.headers["X-Model-Version"] == "cosine-seed3"
        got = [it["item_id"] for it in resp.json()["items"]]
        assert ranking_error(c.app.state.recommender, ["item1", "item2"], 4, False, got) is None


@pytest.mark.parametrize("k, ok", [(1, True), (50, True), (0, False), (-3, False), (51, False)])
def test_k_bounds(svc, k, ok):
    resp = post(svc, {"history": ["item1"], "k": k})
    body = resp.json()
    if ok:
        assert resp.status_code == 200 and len(body["items"]) == k
    else:
        assert resp.status_code == 400
        assert body["error"] == "validation_error"
        assert body["message"].startswith("k: ")
        assert ("at most 50" in body["message"]) if k > 50 else ("greater than or equal to 1" in body["message"])
        assert body["details"][0]["field"] == "k"


def test_k_is_capped_at_the_catalogue_size():
    with client(CosineRecommender(n_items=20), max_k=100) as c:
        resp = post(c, {"history": ["item1"], "k": 21})
        assert resp.status_code == 400 and "at most 20 (the catalogue size)" in resp.json()["message"]
        assert post(c, {"history": ["item1"], "k": 20}).status_code == 200


@pytest.mark.parametrize(
    "payload, field_name, problem",
    [
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
        ('{"history": ["item1"], "k": NaN}', "k", "valid integer"),
        ({"history": ["item1"], "exclude_history": "yes"}, "exclude_history", "valid boolean"),
        ({"history": ["item1"], "histroy": ["item2"]}, "histroy", "Extra inputs are not permitted"),
        ([{"history": ["item1"]}], "body", "expected a JSON object, got a JSON array"),
        ('"item1"', "body", "expected a JSON object, got a JSON string"),
        ("", "body", "Field required"),
    ],
)
def test_validation_errors_name_the_field_and_problem(svc, payload, field_name, problem):
    resp = post(svc, payload)
    body = resp.json()
    assert resp.status_code == 400, body
    assert body["error"] == "validation_error"
    assert resp.headers["X-Model-Version"] == body["model_version"] == "cosine-seed0"
    assert any(d["field"] == field_name and problem in d["problem"] for d in body["details"]), body
    assert f"{field_name}: " in body["message"] and problem in body["message"]


def test_a_body_sent_as_another_content_type_is_told_to_send_json(svc):
    resp = post(svc, json.dumps({"history": ["item1"]}), headers={"Content-Type": "text/plain"})
    assert resp.status_code == 400
    assert resp.json()["details"] == [
        {"field": "body", "problem": "expected a JSON object; send it with Content-Type: application/json"}
    ]


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ('{"history": ["item1"', "not valid JSON"),
        ('{"history": ["item1"]} x', "not valid JSON: Extra data"),
        (b'{"history": ["\xff"]}', "not UTF-8"),
        ('{"history": ' + "[" * 2_000 + "]" * 2_000 + "}", "nested too deeply"),
        ('{"a": ' * 8_000 + "1" + "}" * 8_000, "nested too deeply"),
    ],
)
def test_malformed_json_is_a_400(svc, raw, fragment):
    resp = post(svc, raw)
    body = resp.json()
    assert resp.status_code == 400, body
    assert body["error"] == "malformed_json"
    assert fragment in body["message"]
    assert post(svc, {"history": ["item2"]}).status_code == 200  # the app is unaffected


def test_unknown_path_and_wrong_method(svc):
    resp = svc.get("/nope")
    assert resp.status_code == 404 and resp.json()["error"] == "not_found" and "/nope" in resp.json()["message"]
    assert "POST /recommend" in resp.json()["message"]
    assert svc.post("/recommendations", json={"history": ["item1"]}).status_code == 404
    assert svc.get("/health/", follow_redirects=False).status_code == 404  # no redirect to /health
    resp = svc.get("/recommend")
    assert resp.status_code == 405 and resp.headers["Allow"] == "POST" and "accepts POST" in resp.json()["message"]
    resp = svc.delete("/health")
    assert resp.status_code == 405 and resp.headers["Allow"] == "GET"
    assert resp.headers["X-Model-Version"] == "cosine-seed0"
    resp = svc.request("BREW", "/recommend")
    assert resp.status_code == 405 and "BREW" in resp.json()["message"]


def test_oversized_bodies_are_refused():
    with client(CosineRecommender(), max_body_bytes=1024) as c:
        resp = post(c, {"history": ["item1"], "pad": "x" * 2000})  # a declared Content-Length over the limit
        assert resp.status_code == 413
        body = resp.json()
        assert (
            body["error"] == "payload_too_large"
            and body["message"] == f"request body is {len(resp.request.content)} bytes; the limit is 1024 bytes"
        )
        assert resp.headers["X-Model-Version"] == "cosine-seed0"

        def chunks():  # no Content-Length (chunked): refused once the limit is passed
            yield b'{"history": ["item1"], "pad": "'
            for _ in range(10):
                yield b"x" * 500
            yield b'"}'

        resp = c.post("/recommend", content=chunks(), headers={"Content-Type": "application/json"})
        assert resp.status_code == 413 and "the limit is 1024 bytes" in resp.json()["message"]
        assert post(c, {"history": ["item1"], "k": 2}).status_code == 200
    with pytest.raises(ValueError, match="max_body_bytes must be >= 1"):
        create_app(CosineRecommender(), max_body_bytes=0)


def test_lone_surrogates_are_echoed_as_json_escapes(svc):
    """Ids that are not valid Unicode are echoed as JSON escapes (the body stays UTF-8), never a 500."""
    resp = post(svc, '{"history": ["item1", "\\udcff"], "k": 2}')
    assert resp.status_code == 200 and resp.json()["dropped"] == ["\udcff"]
    assert b'"\\udcff"' in resp.content
    resp = post(svc, '{"history": ["\\ud800"]}')
    assert resp.status_code == 422 and resp.json()["error"] == "unprocessable_history"
    resp = post(svc, '{"history": ["item1"], "\\ud800": 1}')
    assert resp.status_code == 400 and resp.json()["error"] == "validation_error"


def test_value_error_becomes_422_with_its_message(svc):
    resp = post(svc, {"history": ["unknown-a", "unknown-b"]})
    assert resp.status_code == 422
    assert resp.json()["error"] == "unprocessable_history"
    assert resp.json()["message"] == "none of the 2 history ids is in the catalogue"
    assert resp.headers["X-Model-Version"] == "cosine-seed0"


class Exploding(CosineRecommender):
    def recommend(self, history, k=None, exclude_history=False):
        raise RuntimeError("index file vanished")


class NaNScores(CosineRecommender):
    def recommend(self, history, k=None, exclude_history=False):
        return {"items": [{"item_id": "item1", "title": "t", "score": float("nan")}], "dropped": []}


@pytest.mark.parametrize(
    "recommender, logged", [(Exploding(), "index file vanished"), (NaNScores(), "non-finite score nan")]
)
def test_a_server_fault_is_a_short_500_and_logged(caplog, recommender, logged):
    with client(recommender) as c, caplog.at_level(logging.ERROR, logger="laser.service"):
        resp = post(c, {"history": ["item1"]})
        assert resp.status_code == 500
        body = resp.json()
        assert body["error"] == "internal_error" and "see the server log" in body["message"]
        assert "Traceback" not in body["message"] and logged not in body["message"]
        assert resp.headers["X-Model-Version"] == "cosine-seed0"
        assert any(r.exc_info and logged in str(r.exc_info[1]) for r in caplog.records)
        assert c.get("/health").status_code == 200  # the app still serves


def test_health_and_readiness():
    app = create_app(CosineRecommender())
    c = TestClient(app)
    resp = c.get("/ready")  # the app's startup (its lifespan) has not run yet
    assert resp.status_code == 503 and resp.json()["error"] == "not_ready"
    assert resp.headers["X-Model-Version"] == "cosine-seed0"
    assert c.get("/health").status_code == 200  # live all the same
    with c:
        resp = c.get("/health")
        assert resp.status_code == 200
        assert resp.json() == {"status": "ok", "model_version": "cosine-seed0", "n_items": N_ITEMS}
        assert resp.headers["X-Model-Version"] == "cosine-seed0" and resp.headers["Cache-Control"] == "no-store"
        assert c.get("/health?verbose=1").status_code == 200
        resp = wait_ready(c.get)
        assert resp.json() == {"status": "ready", "model_version": "cosine-seed0", "n_items": N_ITEMS}
    assert c.get("/ready").status_code == 503  # after the shutdown


def test_a_shutdown_signal_turns_readiness_off_at_once():
    """uvicorn finishes the requests in flight after SIGTERM/SIGINT; /ready answers 503 from the signal on."""
    import uvicorn

    from laser_core.service import _Server

    with client(CosineRecommender()) as c:
        server = _Server(uvicorn.Config(c.app))
        wait_ready(c.get)
        server.handle_exit(signal.SIGTERM, None)
        assert server.should_exit
        resp = c.get("/ready")
        assert resp.status_code == 503 and resp.json()["error"] == "not_ready"
        assert post(c, {"history": ["item1"], "k": 1}).status_code == 200  # still answering meanwhile


def test_openapi_docs_describe_the_endpoints(svc):
    spec = svc.get("/openapi.json").json()
    assert set(spec["paths"]) == {"/recommend", "/health", "/ready"}
    assert spec["info"]["version"] == "cosine-seed0"
    post_op = spec["paths"]["/recommend"]["post"]
    assert set(post_op["responses"]) >= {"200", "400", "413", "422", "500"}
    request = spec["components"]["schemas"]["RecommendRequest"]
    assert request["required"] == ["history"] and request["additionalProperties"] is False
    assert request["properties"]["history"]["maxItems"] == 1000
    assert set(spec["components"]["schemas"]["RecommendResponse"]["properties"]) >= {
        "model_version",
        "items",
        "dropped",
    }
    resp = svc.get("/docs")
    assert resp.status_code == 200 and "swagger" in resp.text.lower()


def test_create_app_rejects_objects_that_are_not_recommenders_and_bad_limits():
    with pytest.raises(TypeError, match="has no 'recommend'"):
        create_app(object())
    with pytest.raises(ValueError, match="max_k must be >= 1"):
        create_app(CosineRecommender(), max_k=0)


def test_concurrent_clients_all_get_their_own_correct_answer(svc):
    n_threads, per_thread = 8, 10
    rng = np.random.default_rng(42)
    jobs = [
        [
            (
                [f"item{j}" for j in rng.choice(N_ITEMS, size=int(rng.integers(1, 12)), replace=False)],
                int(rng.integers(1, 30)),
                bool(rng.integers(0, 2)),
            )
            for _ in range(per_thread)
        ]
        for _ in range(n_threads)
    ]
    failures: list[str] = []
    start = threading.Barrier(n_threads)

    def run(my_jobs):
        try:
            start.wait()
            for history, k, exclude in my_jobs:
                resp = post(svc, {"history": history, "k": k, "exclude_history": exclude})
                if resp.status_code != 200:
                    failures.append(f"{history} k={k} exclude={exclude}: HTTP {resp.status_code} {resp.text}")
                    continue
                error = ranking_error(
                    svc.recommender, history, k, exclude, [it["item_id"] for it in resp.json()["items"]]
                )
                if error:
                    failures.append(error)
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(repr(exc))

    threads = [threading.Thread(target=run, args=(jobs[t],)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


def test_the_serving_process_never_imports_torch():
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, "tests")
        import laser_cli.serving_cmds, laser_core.serving
        from laser_core.service import create_app
        from fastapi.testclient import TestClient
        from test_service import CosineRecommender
        with TestClient(create_app(CosineRecommender())) as c:
            assert c.post("/recommend", json={"history": ["item1"]}).status_code == 200
            assert c.get("/openapi.json").status_code == 200
        mods = [m for m in ("torch", "transformers") if m in sys.modules]
        assert not mods, mods
        print("no torch")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no torch"


# ------------------------------------------------------------------------------------- the real uvicorn server
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _wait_until_ready(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early ({proc.returncode}): {proc.stderr.read()}")
        try:
            status, body = _get(port, "/ready")
            if status == 200:
                return body
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def _stop(proc: subprocess.Popen, sig: int) -> tuple[str, str]:
    proc.send_signal(sig)
    try:
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


SERVE_COSINE = (
    "import logging, sys; sys.path.insert(0, 'tests'); logging.basicConfig(level=logging.INFO)\n"
    "from test_service import {cls}\nfrom laser_core.service import bind, create_app, serve\n"
    "serve(create_app({cls}(seed=5)), bind('127.0.0.1', {port}))\n"
    "print('returned', flush=True)\n"
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_uvicorn_serves_then_shuts_down_gracefully_on_ctrl_c_or_sigterm(sig):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_COSINE.format(cls="CosineRecommender", port=port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait_until_ready(port, proc)["model_version"] == "cosine-seed5"
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/recommend",
            method="POST",
            data=json.dumps({"history": ["item1", "item2"], "k": 3}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.headers["X-Model-Version"] == "cosine-seed5"
            got = [it["item_id"] for it in json.loads(resp.read())["items"]]
        assert ranking_error(CosineRecommender(seed=5), ["item1", "item2"], 3, False, got) is None
        assert _get(port, "/health")[0] == 200
    finally:
        stdout, stderr = _stop(proc, sig)
    assert proc.returncode == 0, stderr
    assert f"serving model cosine-seed5 ({N_ITEMS} items) on http://127.0.0.1:{port}" in stderr
    assert "returned" in stdout and "Shutting down" in stderr and "Traceback" not in stderr
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


class SlowCosine(CosineRecommender):
    def recommend(self, history, k=None, exclude_history=False):
        time.sleep(2.0)
        return super().recommend(history, k, exclude_history)


def test_a_request_in_flight_is_answered_after_sigterm():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_COSINE.format(cls="SlowCosine", port=port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    answers: list = []

    def slow_request():
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/recommend",
            method="POST",
            data=json.dumps({"history": ["item7"], "k": 2}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                answers.append((resp.status, json.loads(resp.read())))
        except Exception as exc:  # noqa: BLE001 - asserted below
            answers.append(exc)

    try:
        _wait_until_ready(port, proc)
        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(0.8)  # the request is in the recommender now
        proc.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
    finally:
        _, stderr = _stop(proc, signal.SIGTERM) if proc.poll() is None else proc.communicate()
    assert proc.returncode == 0, stderr
    assert len(answers) == 1 and answers[0][0] == 200, answers
    assert [it["item_id"] for it in answers[0][1]["items"]][0] == "item7"


def test_a_busy_port_is_one_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}: .*in use"):
            bind("127.0.0.1", port)


def test_laser_serve_rejects_a_bad_bundle_or_option_in_one_line(tmp_path):
    from click.testing import CliRunner

    from laser_cli.serving_cmds import serve as serve_command

    res = CliRunner().invoke(serve_command, ["--bundle", str(tmp_path), "--port", "0"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(tmp_path) in lines[0], res.output
    res = CliRunner().invoke(serve_command, ["--bundle", str(tmp_path), "--max-body-bytes", "0"])
    assert res.exit_code == 2 and "--max-body-bytes" in res.output
    assert "/ready" in CliRunner().invoke(serve_command, ["--help"]).output


# ------------------------------------------------------------------------------ hostile and careless clients
@contextmanager
def running(recommender, settings: ServerSettings | None = None, **app_kwargs) -> Iterator[tuple]:
    """The real uvicorn server (``build_server``: the connection guard included) in a thread on a free port of
    127.0.0.1; yields (server, port) once it listens, stops it after."""
    app = create_app(recommender, **app_kwargs)
    sock = bind("127.0.0.1", 0)
    server = build_server(app, settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield server, sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def _connect(port: int, timeout: float = 30.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not piece:
            return data
        data += piece


def _status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _http(port: int, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Gated(CosineRecommender):
    """Blocks every query with k=5 until ``gate`` is set (the warm-up query, k=1, passes); counts the queries that
    entered and finished."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = 0
        self.finished = 0
        self.lock = threading.Lock()

    def recommend(self, history, k=None, exclude_history=False):
        if k == 5:
            with self.lock:
                self.entered += 1
            assert self.gate.wait(timeout=120), "the test never opened the gate"
            with self.lock:
                self.finished += 1
        return super().recommend(history, k, exclude_history)


def test_idle_connections_past_the_limit_are_closed_and_health_still_answers():
    """21,000 idle connections took main down at its file limit. With a limit of 8 connections, 20 silent ones: the
    longest-idle are closed to make room and /health answers on a new connection; at most 8 stay open."""
    settings = ServerSettings(max_connections=8, header_timeout=60)
    with running(CosineRecommender(), settings) as (server, port):
        idle = [_connect(port) for _ in range(20)]
        try:
            assert _http(port, "GET", "/health")[0] == 200
            closed = 0
            for sock in idle[:13]:  # the 12 that made room for the later ones and the one /health replaced
                sock.settimeout(30)
                assert _read_until_closed(sock) == b""  # closed without an answer: it never asked anything
                closed += 1
            assert closed == 13 and len(server.guard.open) <= 8
            assert server.guard.counts["closed_at_limit"] >= 13
        finally:
            for sock in idle:
                sock.close()


class _FakeConnection:
    """What the connection guard asks of a connection: whether its client's bytes wait unread, whether part of a
    request head was read already, and to be closed."""

    def __init__(self, name: str, unread: bool = False, head_started: bool = False) -> None:
        self.name, self.unread, self.head_started, self.closed = name, unread, head_started, False

    def has_unread_bytes(self) -> bool:
        return self.unread

    def close_idle(self) -> None:
        self.closed = True


def test_at_the_limit_the_guard_closes_a_trickling_head_before_a_slow_upload_or_a_served_client():
    """The order in which the guard makes room: a silent connection; then a head that trickles (part read, more
    bytes waiting: a flood's slow head, which the soak found ahead of real clients when every trickler had just
    sent its byte); then the upload stalled longest; then the longest-idle keep-alive connection; a new
    connection whose first bytes wait unread (most likely a whole request) last."""
    from laser_core.service import _ConnectionGuard

    guard = _ConnectionGuard(ServerSettings(max_connections=4, header_timeout=60), "v")
    new_request = _FakeConnection("new request", unread=True)
    trickler = _FakeConnection("trickling head", unread=True, head_started=True)
    upload, served = _FakeConnection("slow upload"), _FakeConnection("kept alive")
    for conn in (new_request, trickler, upload, served):
        assert guard.admit(conn)
    guard.request_started(upload, body_to_come=True)
    guard.request_started(served, body_to_come=False)
    guard.request_completed(served)
    closed = []
    for i in range(4):
        assert guard.admit(_FakeConnection(f"flood {i}", unread=True))
        closed += [c.name for c in (new_request, trickler, upload, served) if c.closed and c.name not in closed]
    assert closed == ["trickling head", "slow upload", "kept alive", "new request"]
    silent = _FakeConnection("silent")
    assert guard.admit(silent) and not silent.closed  # room made by the oldest flood connection (unread bytes)
    assert guard.admit(_FakeConnection("late", unread=True))
    assert silent.closed  # a connection with nothing unread goes first, older ones with a request waiting stay


def test_past_the_limit_a_stalled_body_makes_room_and_with_every_request_busy_a_new_connection_gets_503():
    rec = Gated()
    with running(rec, ServerSettings(max_connections=3), scoring_threads=3) as (server, port):
        wait_ready(lambda path: _Resp(*_http(port, "GET", path)))
        answers: list = []

        def slow_request() -> None:
            answers.append(_http(port, "POST", "/recommend", {"history": ["item1"], "k": 5}))

        threads = [threading.Thread(target=slow_request) for _ in range(3)]
        for t in threads[:2]:
            t.start()
        while rec.entered < 2:
            time.sleep(0.01)
        with _connect(port) as stalled:  # the third slot: a body that stops halfway
            stalled.sendall(b'POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"hist')
            assert _http(port, "GET", "/health")[0] == 200  # made room by closing the stalled body
            assert _read_until_closed(stalled) == b""
        threads[2].start()
        while rec.entered < 3:
            time.sleep(0.01)
        with _connect(port) as extra:  # three requests in the app: nothing to close
            status, body = _status_and_body(_read_until_closed(extra))
        assert status == 503 and body["error"] == "over_capacity" and body["model_version"] == "cosine-seed0"
        rec.gate.set()
        for t in threads:
            t.join(timeout=60)
        assert [a[0] for a in answers] == [200, 200, 200]
        assert server.guard.counts["refused"] == 1 and server.guard.counts["closed_at_limit"] == 1


class _Resp:
    """``(status, body)`` as a response object for :func:`wait_ready`."""

    def __init__(self, status: int, body: dict) -> None:
        self.status_code, self._body = status, body
        self.text = json.dumps(body)

    def json(self) -> dict:
        return self._body


def test_a_request_head_sent_byte_by_byte_is_cut_after_the_header_timeout():
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 400 + b"\r\n\r\n"
    with running(CosineRecommender(), ServerSettings(header_timeout=1.0)) as (server, port):
        with _connect(port) as sock:
            sent = 0
            try:
                for byte in head:  # one byte per 20 ms: the whole head would take over 8 s
                    sock.sendall(bytes([byte]))
                    sent += 1
                    time.sleep(0.02)
            except (BrokenPipeError, ConnectionResetError):
                pass
            status, body = _status_and_body(_read_until_closed(sock))
        assert sent < len(head)  # cut before the head was whole, though bytes kept coming
        assert status == 408 and body["error"] == "request_timeout" and "request head" in body["message"]
        with _connect(port) as silent:  # accepted, then nothing: closed without an answer
            assert _read_until_closed(silent) == b""
        assert server.guard.counts["head_timeouts"] == 2


def test_half_a_body_is_cut_after_the_body_timeout():
    with running(CosineRecommender(), body_timeout=1.0) as (server, port):
        with _connect(port) as sock:
            payload = json.dumps({"history": ["item1", "item2"], "k": 3}).encode()
            sock.sendall(
                b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload[: len(payload) // 2]
            )
            raw = _read_until_closed(sock)
        status, body = _status_and_body(raw)
        assert status == 408 and body["error"] == "request_timeout" and "body" in body["message"]
        assert b"connection: close" in raw.lower()
        assert _http(port, "POST", "/recommend", {"history": ["item1"], "k": 2})[0] == 200  # others are served


def test_an_idle_keep_alive_connection_is_closed():
    with running(CosineRecommender(), ServerSettings(keep_alive_timeout=0.5)) as (server, port):
        with _connect(port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            raw = _read_until_closed(sock)  # the answer, then the close once the connection idles
        status, body = _status_and_body(raw)
        assert status == 200 and body["status"] == "ok" and not server.guard.open


def test_health_and_ready_answer_while_every_scoring_thread_is_busy():
    """Main ran /health in the thread pool that scoring fills (40 threads): 50 slow /recommend requests held it
    until they finished. Here /health and /ready answer while all 50 are still in flight."""
    rec = Gated()
    with running(rec, scoring_threads=2) as (server, port):
        wait_ready(lambda path: _Resp(*_http(port, "GET", path)))
        answers: list = []
        threads = [
            threading.Thread(
                target=lambda: answers.append(_http(port, "POST", "/recommend", {"history": ["item1"], "k": 5}))
            )
            for _ in range(50)
        ]
        for t in threads:
            t.start()
        while rec.entered < 2:
            time.sleep(0.01)
        assert _http(port, "GET", "/health")[0] == 200
        assert _http(port, "GET", "/ready")[0] == 200
        assert rec.finished == 0 and not answers  # answered ahead of every scoring request
        assert rec.entered == 2  # the scoring pool is bounded: the others wait for a thread
        rec.gate.set()
        for t in threads:
            t.join(timeout=120)
        assert [a[0] for a in answers] == [200] * 50


class FirstQueryBlocks(CosineRecommender):
    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def recommend(self, history, k=None, exclude_history=False):
        assert self.release.wait(timeout=120), "the test never released the first query"
        return super().recommend(history, k, exclude_history)


def test_ready_turns_200_only_after_the_warm_up_query_went_through():
    rec = FirstQueryBlocks()
    with running(rec) as (server, port):
        assert _http(port, "GET", "/health")[0] == 200
        status, body = _http(port, "GET", "/ready")
        assert status == 503 and body["error"] == "not_ready" and "warm-up" in body["message"]
        rec.release.set()
        assert wait_ready(lambda path: _Resp(*_http(port, "GET", path))).json()["status"] == "ready"


def test_a_failed_warm_up_keeps_ready_503_and_is_logged_once(caplog):
    with caplog.at_level(logging.ERROR, logger="laser.service"), client(Exploding()) as c:
        deadline = time.monotonic() + 60
        while not any("warm-up" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for _ in range(3):
            resp = c.get("/ready")
            assert resp.status_code == 503 and "the warm-up query failed" in resp.json()["message"]
            assert "index file vanished" in resp.json()["message"]
        assert c.get("/health").status_code == 200
    assert sum("warm-up query failed" in r.getMessage() for r in caplog.records) == 1


ACCEPT_ERRORS = """
import logging, os, resource, sys, threading, time
sys.path.insert(0, "tests")
logging.basicConfig(level=logging.INFO)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from test_service import CosineRecommender
from laser_core.service import ServerSettings, bind, create_app, serve

def exhaust():  # once serving, take every free file for 3 s: accept() fails with EMFILE meanwhile
    time.sleep(1.0)
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    print("exhausted", flush=True)
    time.sleep(3.0)
    for fd in held:
        os.close(fd)
    print("released", flush=True)

threading.Thread(target=exhaust, daemon=True).start()
serve(create_app(CosineRecommender()), bind("127.0.0.1", {port}), ServerSettings(log_interval=60))
"""


def test_accept_errors_at_the_file_limit_are_logged_once_per_interval():
    """Main logged a traceback for every failed accept() (311,295 in 25 s at the file limit)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", ACCEPT_ERRORS.replace("{port}", str(port))],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    socks = []
    try:
        assert proc.stdout.readline().strip() == "exhausted", proc.stderr.read()
        socks = [_connect(port) for _ in range(5)]  # wait in the backlog: accept() fails while no file is free
        assert proc.stdout.readline().strip() == "released"
        deadline = time.monotonic() + 60
        while True:  # asyncio retries accept() a second after a failure
            try:
                assert _get(port, "/health")[0] == 200
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        for sock in socks:
            sock.close()
        _, stderr = _stop(proc, signal.SIGINT)
    assert proc.returncode == 0, stderr
    failed = [line for line in stderr.splitlines() if "accept() failed" in line]
    assert len(failed) == 1, stderr[-3000:]
    assert "Too many open files" in failed[0] and "open-file limit 256" in failed[0]
    assert "Traceback" not in stderr and "out of system resource" not in stderr
    assert "more accept() errors not logged" in stderr  # the count of the dropped ones, at shutdown


def test_server_settings_are_checked_against_the_file_limit():
    with pytest.raises(ValueError, match=r"open-file limit \(ulimit -n\) is \d+: it leaves room for \d+ connections"):
        ServerSettings(max_connections=10**9).resolved()
    from laser_core.service import FILE_MARGIN, open_file_limit

    settings = ServerSettings().resolved()
    assert settings.accept_batch >= 16 and settings.backlog == 2048
    assert 0 < settings.max_connections + 3 * settings.accept_batch + FILE_MARGIN < open_file_limit()
    with pytest.raises(ValueError, match="header_timeout must be > 0"):
        ServerSettings(header_timeout=0).resolved()


# ------------------------------------------------------------------------------------- a real exported bundle
DATA = {"n_users": 120, "n_items": 40, "n_user_types": 4, "seed": 3}  # the `data` fixture's (tests/conftest.py)


@pytest.fixture(scope="module")
def exported(data, tmp_path_factory):
    """A bundle from laser_core.export.export_bundle (tiny random Llama backbone, untrained BERT4Rec + M-Former),
    its torch reference model and item table."""
    if importlib.util.find_spec("laser_core.serving") is None:
        pytest.skip("laser_core.serving (Recommender over an exported bundle) is not in this checkout")
    import torch
    from conftest import export_tiny_bundle, tiny_spec  # not at the top: server subprocesses import this module

    from laser_core.sr import SRConfig, build_model

    ds, _ = data
    torch.manual_seed(0)
    sr = build_model(SRConfig(model="bert4rec", hidden_size=16, max_len=8), ds.n_items).eval()
    out = tmp_path_factory.mktemp("service-export") / "bundle"
    # nudge: the suffix off its EOS initialisation so that users differ
    made = export_tiny_bundle(
        out, tiny_spec(quant="none"), ds, sr, nudge=True, k=10, metadata={"model_version": "svc-test-1"}
    )
    return made["bundle"], ds, made["ref"], made["table"]


@pytest.mark.slow  # the export (torch.export of the tiny backbone) takes minutes on 2 cores
def test_serves_a_real_exported_bundle(exported):
    import torch

    from laser_core.serving import Recommender

    bundle, ds, ref, table = exported
    rec = Recommender.load(bundle)
    assert isinstance(rec, RecommenderLike)
    ids = ds.items["item_id"].astype(str).tolist()
    with client(rec) as c:
        resp = c.get("/health")
        assert resp.status_code == 200 and resp.json() == {"status": "ok", "model_version": "svc-test-1", "n_items": 40}
        assert resp.headers["X-Model-Version"] == "svc-test-1"

        rows = [3, 17, 8]
        history = [ids[r] for r in rows[:2]] + ["not-an-item"] + [ids[rows[2]]]
        resp = post(c, {"history": history, "k": 5})
        body = resp.json()
        assert resp.status_code == 200, body
        assert resp.headers["X-Model-Version"] == body["model_version"] == "svc-test-1"
        assert body["dropped"] == ["not-an-item"]
        direct = rec.recommend(history, k=5)
        assert [it["item_id"] for it in body["items"]] == [it.item_id for it in direct.items]
        assert [it["rank"] for it in body["items"]] == [1, 2, 3, 4, 5]
        assert np.allclose([it["score"] for it in body["items"]], [it.score for it in direct.items])
        assert body["items"][0]["title"] == direct.items[0].title
        # the torch model's cosine top-5 for the same history (scores to the ONNX export's float tolerance)
        with torch.no_grad():
            user = ref.embed([rows]).user_embedding[0].numpy()
        cos = (table.numpy() / np.linalg.norm(table.numpy(), axis=1, keepdims=True)) @ (user / np.linalg.norm(user))
        want = np.sort(cos)[::-1][:5]
        got = cos[[ids.index(it["item_id"]) for it in body["items"]]]
        assert np.allclose(got, want, atol=1e-4)

        # k beyond the scorer's baked-in top-10, with the history excluded (the recommender's full ranking)
        body = post(c, {"history": history, "k": 15, "exclude_history": True}).json()
        assert len(body["items"]) == 15
        assert not {ids[r] for r in rows} & {it["item_id"] for it in body["items"]}

        resp = post(c, {"history": ["nope", "nada"]})
        assert resp.status_code == 422 and resp.json()["error"] == "unprocessable_history"
        assert "none of its 2 item id(s) is in the catalogue" in resp.json()["message"]
        resp = post(c, {"history": history, "k": 41})
        assert resp.status_code == 400 and "at most 40 (the catalogue size)" in resp.json()["message"]

    # a connection limit the open-file limit cannot hold is one line naming the option (after the bundle loaded)
    from click.testing import CliRunner

    from laser_cli.serving_cmds import serve as serve_command

    res = CliRunner().invoke(serve_command, ["--bundle", str(bundle), "--port", "0", "--max-connections", "1000000000"])
    assert res.exit_code == 2 and "--max-connections" in res.output and "open-file limit" in res.output, res.output

    # the command-line entry point (`laser serve`) over the same bundle: serves, then exits cleanly on SIGTERM
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "laser_cli.main",
            "serve",
            "--bundle",
            str(bundle),
            "--port",
            str(port),
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait_until_ready(port, proc) == {"status": "ready", "model_version": "svc-test-1", "n_items": 40}
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/recommend",
            method="POST",
            data=json.dumps({"history": history, "k": 5}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert [it["item_id"] for it in json.loads(resp.read())["items"]] == [it.item_id for it in direct.items]
    finally:
        _, stderr = _stop(proc, signal.SIGTERM)
    assert proc.returncode == 0, stderr
    assert "serving model svc-test-1" in stderr and "Shutting down" in stderr and "Traceback" not in stderr


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
    if sys.platform.startswith("linux"):
        assert report["memory"]["rss_mib"]["end"] > 0 and report["memory"]["threads"]["end"] >= 1


SOAK_COSINE = (
    "import logging, sys; sys.path.insert(0, 'tests'); logging.basicConfig(level=logging.INFO)\n"
    "from test_service import CosineRecommender\n"
    "from laser_core.service import ServerSettings, bind, create_app, serve\n"
    "serve(create_app(CosineRecommender(seed=5), body_timeout={t}), bind('127.0.0.1', 0),\n"
    "      ServerSettings(header_timeout={t}, max_connections=200))\n"
)


def test_soak_every_request_is_answered_and_none_is_a_5xx():
    """bench/soak.py in small: 300 requests at concurrency 8, every kind of client of the full soak (slow senders
    and readers, hang-ups, stalled heads and bodies, oversized, malformed and deeply nested JSON ...) and a flood
    of 300 connections (silent, slow heads, half bodies) past the server's limit of 200, against a uvicorn server
    process (the cosine recommender); /health probed throughout."""
    soak = _soak()
    command = [sys.executable, "-c", SOAK_COSINE.format(t=soak.STALL_TIMEOUT_S)]
    server = soak.ServerProcess(command, start_timeout=120)
    try:
        report = soak.run_soak(
            server, [f"item{i}" for i in range(N_ITEMS)], 20, requests=300, concurrency=8, max_seconds=240, warmup=16
        )
    finally:
        exit_status = server.stop()
        server.cleanup()
    assert set(report["by_kind"]) == set(soak.MIX)  # every kind ran at least once
    _check_soak(report, 300)
    flood = report["flood"]
    assert flood["target_open"] == 300 and flood["opened"] >= 300 and flood["closed_without_answer"] > 0
    assert report["health_probe"]["failures"] == 0 and report["health_probe"]["during_flood"]["n"] > 0
    assert report["server_log"]["accept_error_lines"] == 0
    assert exit_status == 0


@pytest.mark.slow  # needs the exported bundle (minutes on 2 cores)
def test_soak_against_a_real_bundle_served_by_laser_serve(exported):
    soak = _soak()
    bundle, ds, _, _ = exported
    server = soak.ServerProcess(soak.bundle_server_command(bundle, threads=1), nofile=1024)  # the flood: 1.5 x ~700
    try:
        report = soak.run_soak(
            server,
            ds.items["item_id"].astype(str).tolist(),
            20,
            requests=200,
            concurrency=8,
            max_seconds=300,
            warmup=16,
        )
    finally:
        exit_status = server.stop()
        server.cleanup()
    _check_soak(report, 200)
    assert exit_status == 0
