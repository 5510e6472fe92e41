"""`miles router` in front of two real `miles serve` worker processes (all subprocesses on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
import urllib.parse

import httpx
import openai
import pytest

from miles.serve.launch import launch_router, launch_server
from miles.testing import make_checkpoint

pytestmark = pytest.mark.slow

WORKER_ARGS = ["--max-model-len", "256", "--kv-cache-tokens", "8192", "--log-level", "warning"]
ROUTER_ARGS = ["--health-interval", "0.3", "--health-failure-threshold", "1", "--log-level", "warning"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("router") / "ckpt", "qwen3", seed=0)


@pytest.fixture(scope="module")
def cluster(ckpt):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(launch_server, ckpt, args=WORKER_ARGS) for _ in range(2)]
        workers = [f.result() for f in futs]
    router = launch_router([w.url for w in workers], args=ROUTER_ARGS)
    yield router, workers
    router.stop()
    for w in workers:
        w.stop()


def _workers(router) -> dict[str, dict]:
    return {w["url"]: w for w in httpx.get(router.url + "/list_workers", trust_env=False).json()["workers"]}


def _wait(pred, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _gen(client, prompt, n=8, **kw):
    return client.post("/generate", json={"input_ids": prompt, "sampling_params": {
        "max_new_tokens": n, "temperature": 0, "ignore_eos": True}}, **kw)


def test_forwards_native_and_openai_apis(cluster):
    router, workers = cluster
    with httpx.Client(base_url=router.url, timeout=60, trust_env=False) as c:
        via_router = _gen(c, [5, 6, 7])
        direct = _gen(httpx.Client(base_url=workers[0].url, timeout=60, trust_env=False), [5, 6, 7])
        assert via_router.status_code == 200 and via_router.headers["x-miles-worker"] in {w.url for w in workers}
        assert via_router.json()["output_ids"] == direct.json()["output_ids"]
        # streaming /generate through the router
        body = {"input_ids": [5, 6, 7], "stream": True, "sampling_params": {"max_new_tokens": 6, "temperature": 0,
                                                                             "ignore_eos": True}}
        with c.stream("POST", "/generate", json=body) as r:
            lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "[DONE]" and json.loads(lines[-2])["output_ids"] == direct.json()["output_ids"][:6]
        # a 4xx from the worker is passed through, not retried
        bad = c.post("/generate", json={"text": "x", "sampling_params": {"temperature": -1}})
        assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
    oai = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
    assert oai.models.list().data[0].id == "ckpt"
    msgs = [{"role": "user", "content": "hi"}]
    full = oai.chat.completions.create(model="ckpt", messages=msgs, max_tokens=8, temperature=0, n=2)
    assert len(full.choices) == 2 and full.choices[0].message.content == full.choices[1].message.content
    text = "".join(ch.choices[0].delta.content or "" for ch in oai.chat.completions.create(
        model="ckpt", messages=msgs, max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert text == full.choices[0].message.content


def test_least_outstanding_spreads_and_routing_key_pins(cluster):
    router, workers = cluster

    async def burst():
        async with httpx.AsyncClient(base_url=router.url, timeout=60, trust_env=False) as ac:
            return await asyncio.gather(*(_agen(ac, [i + 2, 3], 24) for i in range(16)))

    rs = asyncio.run(burst())
    assert all(r.status_code == 200 for r in rs)
    used = [r.headers["x-miles-worker"] for r in rs]
    assert set(used) == {w.url for w in workers}, used  # concurrent load goes to both
    assert abs(used.count(workers[0].url) - used.count(workers[1].url)) <= 4

    with httpx.Client(base_url=router.url, timeout=60, trust_env=False) as c:
        by_key = {}
        for key in [f"session-{i}" for i in range(16)]:
            seen = {_gen(c, [1, 2], 2, headers={"X-SMG-Routing-Key": key}).headers["x-miles-worker"] for _ in range(3)}
            assert len(seen) == 1, (key, seen)  # a session sticks to one worker
            by_key[key] = seen.pop()
        assert set(by_key.values()) == {w.url for w in workers}  # different sessions spread


async def _agen(ac, prompt, n):
    return await ac.post("/generate", json={"input_ids": prompt, "sampling_params": {
        "max_new_tokens": n, "temperature": 0, "ignore_eos": True}})


def test_fanout_pause_abort_continue(cluster):
    router, workers = cluster
    with httpx.Client(base_url=router.url, timeout=60, trust_env=False) as c:
        assert c.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
        outs: list = []
        ts = [threading.Thread(target=lambda i=i: outs.append(_gen(c, [i + 1, 2], 50))) for i in range(4)]
        try:
            for t in ts:
                t.start()

            def queued():
                infos = [httpx.get(w.url + "/get_server_info", trust_env=False).json()["stats"] for w in workers]
                return sum(s["num_inflight"] for s in infos) == 4 and all(s["paused"] for s in infos)

            _wait(queued, what="4 requests queued on the paused workers")
            assert c.post("/abort_request", json={"abort_all": True}).status_code == 200
            for t in ts:
                t.join(30)
        finally:
            assert c.post("/continue_generation").status_code == 200
        assert [o.json()["meta_info"]["finish_reason"]["type"] for o in outs] == ["abort"] * 4
        assert _gen(c, [1, 2], 3).status_code == 200


def test_add_remove_list_workers(cluster):
    router, workers = cluster
    a, b = workers[0].url, workers[1].url
    with httpx.Client(base_url=router.url, timeout=60, trust_env=False) as c:
        assert c.post("/remove_worker", params={"url": b}).json()["success"] is True
        assert c.get("/list_workers").json()["urls"] == [a]
        assert {_gen(c, [i + 1, 2], 2).headers["x-miles-worker"] for i in range(4)} == {a}
        assert c.post("/remove_worker", json={"url": b}).status_code == 404
        assert c.post("/add_worker", json={}).status_code == 400
        r = c.post("/add_worker", json={"url": b})
        assert r.status_code == 200 and r.json()["worker"]["healthy"] is True
        assert sorted(c.get("/list_workers").json()["urls"]) == sorted([a, b])
        # SGLang-gateway style endpoints
        assert c.delete("/workers/" + urllib.parse.quote(b, safe="")).json()["success"] is True
        assert [w["url"] for w in c.get("/workers").json()["workers"]] == [a]
        assert c.post("/workers", json={"url": b}).json()["worker"]["healthy"] is True
        assert sorted(w["url"] for w in c.get("/workers").json()["workers"]) == sorted([a, b])


def test_worker_killed_mid_traffic_then_readmitted(cluster, ckpt):
    """Kill a worker holding in-flight requests: every request still succeeds (retried on the other worker),
    an open SSE stream from it ends with an error event; a restarted worker is re-admitted."""
    router, workers = cluster
    victim = workers[1]
    with httpx.Client(base_url=router.url, timeout=60, trust_env=False) as c:
        key = next(k for k in (f"s{i}" for i in range(200))
                   if _gen(c, [1], 1, headers={"X-SMG-Routing-Key": k}).headers["x-miles-worker"] == victim.url)
    # the victim keeps what it gets in flight (paused), so the kill is guaranteed to hit open requests
    assert httpx.post(victim.url + "/pause_generation", json={"mode": "in_place"}, trust_env=False).status_code == 200

    sse: list[str] = []

    def stream():
        body = {"input_ids": [1, 2], "stream": True, "sampling_params": {"max_new_tokens": 20}}
        with httpx.stream("POST", router.url + "/generate", json=body, headers={"X-SMG-Routing-Key": key},
                          timeout=60, trust_env=False) as r:
            sse.extend(ln for ln in r.iter_lines() if ln)

    results: list = []

    async def traffic(n_requests=32, concurrency=8):
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=router.url, timeout=120, trust_env=False) as ac:
            async def one(i):
                async with sem:
                    return await _agen(ac, [i % 50 + 1, 7, 8], 24)
            return await asyncio.gather(*(one(i) for i in range(n_requests)))

    threads = [threading.Thread(target=stream), threading.Thread(target=lambda: results.append(asyncio.run(traffic())))]
    for t in threads:
        t.start()
    def victim_inflight() -> int:
        return httpx.get(victim.url + "/get_server_info", trust_env=False).json()["stats"]["num_inflight"]

    _wait(lambda: victim_inflight() >= 4, what="requests held by the victim")
    victim.kill()
    for t in threads:
        t.join(180)
    rs = results[0]
    assert [r.status_code for r in rs] == [200] * len(rs), [r.text for r in rs if r.status_code != 200]
    assert all(len(r.json()["output_ids"]) == 24 for r in rs)
    assert {r.headers["x-miles-worker"] for r in rs} == {workers[0].url}  # the paused victim answered none
    assert sse[-1] == "data: [DONE]" and "failed mid-stream" in sse[-2]
    _wait(lambda: not _workers(router)[victim.url]["healthy"], what="dead worker taken out")
    assert httpx.get(router.url + "/list_workers", trust_env=False).json()["num_retries"] >= 3

    restarted = launch_server(ckpt, args=WORKER_ARGS, port=victim.port)
    workers[1] = restarted  # the fixture stops it at the end
    _wait(lambda: _workers(router)[victim.url]["healthy"], what="restarted worker re-admitted")
    served_before = _workers(router)[victim.url]["served"]

    async def burst():
        async with httpx.AsyncClient(base_url=router.url, timeout=60, trust_env=False) as ac:
            return await asyncio.gather(*(_agen(ac, [i + 2, 3], 16) for i in range(8)))

    rs = asyncio.run(burst())
    assert all(r.status_code == 200 for r in rs)
    assert victim.url in {r.headers["x-miles-worker"] for r in rs}
    assert _workers(router)[victim.url]["served"] > served_before


def test_router_api_key_and_no_worker(cluster):
    _, workers = cluster
    with launch_router([workers[0].url], args=[*ROUTER_ARGS, "--wait-for-worker", "1"], api_key="k3y") as r:
        body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}
        assert httpx.post(r.url + "/generate", json=body, trust_env=False).status_code == 401
        assert httpx.get(r.url + "/list_workers", trust_env=False).status_code == 401
        auth = {"Authorization": "Bearer k3y"}
        assert httpx.post(r.url + "/generate", json=body, headers=auth, trust_env=False).status_code == 200
        assert httpx.post(r.url + "/remove_worker", params={"url": workers[0].url}, headers=auth,
                          trust_env=False).status_code == 200
        no = httpx.post(r.url + "/generate", json=body, headers=auth, trust_env=False, timeout=30)
        assert no.status_code == 503 and "no healthy worker" in no.json()["error"]["message"]


def test_client_disconnect_through_router_aborts_on_worker(cluster):
    router, workers = cluster

    def inflight():
        return sum(httpx.get(w.url + "/get_server_info", trust_env=False).json()["stats"]["num_inflight"]
                   for w in workers)

    errors: list = []

    def client():
        try:
            _gen(httpx.Client(base_url=router.url, trust_env=False), [3, 4], 50, timeout=httpx.Timeout(60, read=3.0))
        except httpx.ReadTimeout as e:
            errors.append(e)

    with httpx.Client(base_url=router.url, timeout=60, trust_env=False) as c:
        assert c.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
        try:
            t = threading.Thread(target=client)
            t.start()
            _wait(lambda: inflight() == 1, what="request queued on a paused worker")
            t.join(30)
            assert len(errors) == 1  # the client gave up
            _wait(lambda: inflight() == 0, timeout=10, what="worker-side abort after the client left")
        finally:
            assert c.post("/continue_generation").status_code == 200
