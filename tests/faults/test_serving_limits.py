"""Requests meant to exhaust `cifar-pipeline serve`: an oversized body is refused with 413
before it is read whole (declared or chunked), a deeply nested array with 400 (MLflow's
own server parsed both: gigabytes for one body, a 500 for the nesting), and the server
still answers several clients in parallel with 200s afterwards."""

from __future__ import annotations

import http.client
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest

from tasks.serving import MAX_BODY_BYTES, MAX_DEPTH, nesting_depth

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(pipeline_env, spawn, free_port):
    import mlflow
    import torch

    from model.nets import build_model
    from tasks import registry
    from tasks.settings import Settings

    Settings.from_env().apply()
    torch.manual_seed(0)
    with mlflow.start_run():
        mv = registry.register(build_model("light").eval(), variant="light",
                               tags={"val_acc": "0.1"}, tta=False)
    registry.set_alias(registry.CHAMPION, mv.version)
    port = free_port()
    cli = Path(sys.executable).with_name("cifar-pipeline")
    spawn("cifar-pipeline-serve", [str(cli), "serve", "--port", str(port)],
          f"http://127.0.0.1:{port}/ping", timeout=240)
    pid = next(p.pid for p in psutil.process_iter(["cmdline"])
               if str(port) in (p.info["cmdline"] or []) and "serve" in p.info["cmdline"])
    return {"port": port, "process": psutil.Process(pid)}


def _post(port: int, body, headers: dict | None = None) -> tuple[int, dict, float]:
    """(status, JSON answer, seconds); `body` bytes, or an iterable sent chunked."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    chunked = not isinstance(body, bytes)
    conn.request("POST", "/invocations", body=body, encode_chunked=chunked,
                 headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    return response.status, answer, time.monotonic() - started


def _images(n: int) -> bytes:
    images = np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3))
    return json.dumps({"inputs": images.tolist()}).encode()


def test_a_declared_oversized_body_is_refused_before_it_is_sent(server):
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=10)
    conn.putrequest("POST", "/invocations")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(124 * 2**20))
    conn.endheaders(b'{"inputs": [')  # the rest never comes: the answer cannot wait for it
    response = conn.getresponse()
    assert response.status == 413
    assert "over the limit of 16,777,216 bytes" in json.loads(response.read())["message"]


def test_a_chunked_oversized_body_is_refused_at_the_limit_in_bounded_memory(server):
    rss = server["process"].memory_info().rss
    chunk = b"[" + b"0, " * (2**16 // 3)
    chunks = (chunk for _ in range(MAX_BODY_BYTES // len(chunk) + 2))
    status, answer, seconds = _post(server["port"], chunks)
    assert status == 413 and "send fewer images" in answer["message"]
    assert seconds < 30
    assert server["process"].memory_info().rss - rss < 4 * MAX_BODY_BYTES


@pytest.mark.parametrize("body", [
    b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"inputs": ' + b"[" * (MAX_DEPTH) + b"1" + b"]" * MAX_DEPTH + b"}",
    # Closing brackets inside a string must not hide the depth of what follows.
    b'{"pad": "' + b"]" * 5000 + b'", "inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}",
], ids=["100000 deep", "one past the limit", "brackets hidden in a string"])
def test_deep_nesting_is_a_400_not_a_500(server, body):
    status, answer, _ = _post(server["port"], body)
    assert status == 400, answer
    assert f"more than {MAX_DEPTH}" in answer["message"]


def test_parallel_clients_all_get_200_after_the_attacks(server):
    bodies = [_images(n) for n in (1, 2, 3, 4) * 3]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda b: _post(server["port"], b), bodies))
    assert [status for status, _, _ in results] == [200] * len(bodies)
    assert [len(a["predictions"]) for _, a, _ in results] == [1, 2, 3, 4] * 3


def test_the_largest_allowed_body_is_measured_quickly():
    body = json.dumps({"inputs": np.full((850, 32, 32, 3), 255).tolist()}).encode()
    assert len(body) < MAX_BODY_BYTES
    started = time.perf_counter()
    assert nesting_depth(body) == 5
    assert time.perf_counter() - started < 0.5
