"""`miles serve` HTTP API over a real engine: a real uvicorn server on 127.0.0.1 (free port, in a thread),
driven by httpx and the official `openai` client, compared with the offline engine."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from miles.engine import EngineConfig, LLMEngine, SamplingParams
from miles.serve.launch import ServerThread, serve_engine
from miles.serve.server import build_app
from miles.serve.state import ServerConfig
from miles.testing import make_checkpoint

CTX = 256  # small context so context-length errors are cheap to trigger


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return make_checkpoint(root / "a", "qwen3", seed=0), make_checkpoint(root / "b", "qwen3", seed=1)


def _engine(path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), max_num_seqs=64, kv_cache_tokens=16384, max_model_len=CTX))


@pytest.fixture(scope="module")
def offline(ckpts):
    return _engine(ckpts[0])


@pytest.fixture(scope="module")
def server(ckpts):
    st = serve_engine(_engine(ckpts[0]), served_model_name="tiny")
    yield st
    st.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _wait(pred, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _inflight(http) -> int:
    return http.get("/get_server_info").json()["stats"]["num_inflight"]


# ------------------------------------------------------------------------------------------ SGLang /generate


def test_generate_input_ids_matches_offline_engine(http, offline):
    prompt = [5, 17, 42, 99, 7]
    body = {"input_ids": prompt, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 12, "temperature": 0.8, "top_p": 0.9, "sampling_seed": 1234,
                                "ignore_eos": True}}
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    res = r.json()
    ref = offline.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=1234,
                                                    ignore_eos=True))[0]
    assert res["output_ids"] == ref.output_ids and len(ref.output_ids) == 12
    meta = res["meta_info"]
    assert [t[1] for t in meta["output_token_logprobs"]] == ref.output_ids
    assert [t[0] for t in meta["output_token_logprobs"]] == pytest.approx(ref.logprobs, abs=1e-6)
    assert all(t[2] is None for t in meta["output_token_logprobs"])
    assert meta["finish_reason"] == {"type": "length", "length": 12}
    assert meta["prompt_tokens"] == 5 and meta["completion_tokens"] == 12
    assert meta["weight_version"] == "0" and isinstance(meta["cached_tokens"], int)
    assert res["text"] == offline.tokenizer.decode(ref.output_ids, skip_special_tokens=True)


def test_generate_text_batch_n_and_rids(http, offline):
    sp = {"max_new_tokens": 6, "temperature": 0, "n": 2}
    r = http.post("/generate", json={"text": ["Hello world", "The answer is"], "sampling_params": sp,
                                     "rid": "batch"})
    assert r.status_code == 200, r.text
    res = r.json()
    assert isinstance(res, list) and len(res) == 4
    assert [x["meta_info"]["id"] for x in res] == ["batch_0", "batch_1", "batch_2", "batch_3"]
    tok = offline.tokenizer
    for k, text in enumerate(["Hello world", "The answer is"]):
        ref = offline.generate([tok.encode(text)], SamplingParams(max_new_tokens=6, temperature=0))[0]
        assert res[2 * k]["output_ids"] == ref.output_ids == res[2 * k + 1]["output_ids"]  # greedy: n equal


def test_generate_stop_token_and_no_stop_trim(http, offline):
    prompt = [11, 12, 13]
    greedy = offline.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))[0]
    stop_tok = greedy.output_ids[3]
    k = greedy.output_ids.index(stop_tok)
    for trim in (False, True):
        sp = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True, "stop_token_ids": [stop_tok],
              "no_stop_trim": trim, "skip_special_tokens": False}
        res = http.post("/generate", json={"input_ids": prompt, "sampling_params": sp}).json()
        assert res["output_ids"] == greedy.output_ids[: k + 1]
        assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}
        kept = greedy.output_ids[: k + 1] if trim else greedy.output_ids[:k]
        assert res["text"] == offline.tokenizer.decode(kept, skip_special_tokens=False)


def test_generate_stream_is_cumulative_and_ends_with_done(http, offline):
    prompt = [3, 4, 5, 6]
    body = {"input_ids": prompt, "stream": True, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}}
    events = []
    with http.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert len(objs) >= 2
    lens = [len(o["output_ids"]) for o in objs]
    assert lens == sorted(lens) and lens[-1] == 10
    assert all(o["meta_info"]["finish_reason"] is None for o in objs[:-1])
    ref = offline.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))[0]
    assert objs[-1]["output_ids"] == ref.output_ids
    assert [t[0] for t in objs[-1]["meta_info"]["output_token_logprobs"]] == pytest.approx(ref.logprobs, abs=1e-6)
    assert objs[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_32_concurrent_requests_are_batched(server, http):
    """All 32 complete, and the engine ran them in one batch (engine batch-size statistics)."""
    eng = server.async_engine.engine
    assert http.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    steps_before = eng.stats.num_steps

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=120, trust_env=False) as ac:
            reqs = [ac.post("/generate", json={"input_ids": [i + 3, 9, 10],
                                               "sampling_params": {"max_new_tokens": 12, "ignore_eos": True}})
                    for i in range(32)]
            return await asyncio.gather(*reqs)

    result: list = []
    t = threading.Thread(target=lambda: result.append(asyncio.run(go())))
    t.start()
    try:
        _wait(lambda: _inflight(http) == 32, what="32 queued requests")
    finally:
        assert http.post("/continue_generation").status_code == 200
    t.join(120)
    responses = result[0]
    assert [r.status_code for r in responses] == [200] * 32
    assert all(len(r.json()["output_ids"]) == 12 for r in responses)
    stats = http.get("/get_server_info").json()["stats"]
    new_sizes = list(eng.stats.batch_sizes)[-(eng.stats.num_steps - steps_before):]
    assert max(new_sizes) == 32  # one prefill + decode steps carrying all 32 requests
    assert sum(1 for s in new_sizes if s == 32) >= 11
    assert stats["engine"]["max_batch_size"] >= 32 and stats["max_batch_size"] >= 32
    assert server.async_engine.stats()["engine"]["num_finished"] >= 32  # the blocking form (in-process users)


def test_abort_request_returns_partial_abort(http):
    out: list = []

    def call():
        out.append(http.post("/generate", json={"input_ids": [1, 2, 3], "rid": "to-abort", "return_logprob": True,
                                                "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}))

    assert http.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    t = threading.Thread(target=call)
    t.start()
    try:
        _wait(lambda: _inflight(http) == 1, what="queued request")
        assert http.post("/abort_request", json={"rid": "to-abort"}).status_code == 200
        t.join(30)
    finally:
        http.post("/continue_generation")
    res = out[0].json()
    assert res["meta_info"]["finish_reason"]["type"] == "abort"
    assert res["meta_info"]["id"] == "to-abort" and res["output_ids"] == []
    assert _inflight(http) == 0


def test_pause_abort_mode_and_abort_all(http):
    outs: list = []

    def call(i):
        outs.append(http.post("/generate", json={"input_ids": [i + 1, 2], "sampling_params": {
            "max_new_tokens": 200, "ignore_eos": True}}).json())

    http.post("/pause_generation", json={"mode": "retract"})
    ts = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    try:
        _wait(lambda: _inflight(http) == 3, what="3 queued")
        r = http.post("/pause_generation", json={"mode": "abort"})  # abort mode aborts in-flight requests
        assert r.json()["num_aborted_requests"] == 3
        for t in ts:
            t.join(30)
    finally:
        http.post("/continue_generation")
    assert [o["meta_info"]["finish_reason"]["type"] for o in outs] == ["abort"] * 3
    # abort_all on a running server with nothing in flight is fine, and the server keeps serving
    assert http.post("/abort_request", json={"abort_all": True}).status_code == 200
    assert http.post("/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 2}}).status_code == 200


def test_client_disconnect_aborts_request(http, server):
    http.post("/pause_generation", json={"mode": "in_place"})
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/generate", json={"input_ids": [4, 5], "sampling_params": {
                "max_new_tokens": 100}}, timeout=httpx.Timeout(60, read=1.0), trust_env=False)
        _wait(lambda: _inflight(http) == 0, timeout=10, what="abort after disconnect")  # still paused: aborted
    finally:
        http.post("/continue_generation")


def test_update_weights_from_disk_and_version(http, ckpts):
    prompt = [9, 8, 7, 6]
    sp = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    other = _engine(ckpts[1]).generate([prompt], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    before = http.post("/generate", json={"input_ids": prompt, "sampling_params": sp}).json()
    try:
        r = http.post("/update_weights_from_disk", json={"model_path": str(ckpts[1]), "weight_version": "7"})
        assert r.status_code == 200 and r.json()["success"] is True, r.text
        after = http.post("/generate", json={"input_ids": prompt, "sampling_params": sp}).json()
        assert after["output_ids"] == other[0].output_ids != before["output_ids"]
        assert after["meta_info"]["weight_version"] == "7"
        assert http.get("/get_model_info").json()["weight_version"] == "7"
        bad = http.post("/update_weights_from_disk", json={"model_path": "/nonexistent/dir"})
        assert bad.status_code == 400 and bad.json()["success"] is False and "/nonexistent/dir" in bad.json()["message"]
    finally:
        r = http.post("/update_weights_from_disk", json={"model_path": str(ckpts[0]), "weight_version": "step-8"})
        assert r.status_code == 200
    assert http.get("/get_weight_version").json() == {"weight_version": "step-8"}
    back = http.post("/generate", json={"input_ids": prompt, "sampling_params": sp}).json()
    assert back["output_ids"] == before["output_ids"] and back["meta_info"]["weight_version"] == "step-8"


def test_release_and_resume_memory(http):
    assert http.post("/release_memory_occupation", json={}).status_code == 200
    out: list = []
    t = threading.Thread(target=lambda: out.append(http.post("/generate", json={
        "input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3}})))
    try:
        assert http.get("/get_server_info").json()["stats"]["asleep"] is True
        t.start()
        time.sleep(0.5)
        assert not out  # waits while the engine sleeps
        assert http.post("/resume_memory_occupation", json={"tags": ["weights"]}).status_code == 200
    finally:
        http.post("/resume_memory_occupation")
    t.join(30)
    assert out[0].status_code == 200 and len(out[0].json()["output_ids"]) >= 1


def test_health_and_info_endpoints(http):
    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200
    info = http.get("/get_model_info").json()
    assert info["is_generation"] is True and info["context_length"] == CTX
    assert http.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert http.post("/flush_cache").status_code == 200


# ------------------------------------------------------------------------------------------ OpenAI API


def test_openai_chat_completions(oai, http, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    tok = offline.tokenizer
    prompt_ids = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)
    r = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True)
    ref = offline.generate([prompt_ids], SamplingParams(max_new_tokens=8, temperature=0))[0]
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(ref.output_ids)
    assert r.usage.total_tokens == len(prompt_ids) + len(ref.output_ids)
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.finish_reason in ("stop", "length")
    trimmed = ref.output_ids[:-1] if ref.finish_reason == "stop" else ref.output_ids
    assert ch.message.content == tok.decode(trimmed, skip_special_tokens=True)
    assert [c.logprob for c in ch.logprobs.content] == pytest.approx(ref.logprobs, abs=1e-6)

    # n > 1 with a seed: distinct, reproducible samples
    kw = dict(model="tiny", messages=messages, max_tokens=10, temperature=1.0, n=3, seed=5)
    a, b = oai.chat.completions.create(**kw), oai.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and texts == [c.message.content for c in b.choices]
    assert len(set(texts)) == 3
    assert a.usage.prompt_tokens == len(prompt_ids)

    # streaming returns the same text as non-streaming for the same seed, plus usage
    kw = dict(model="tiny", messages=messages, max_tokens=12, temperature=1.0, seed=9)
    full = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    # streamed log-probs cover every token once, even tokens whose text is held back (partial UTF-8)
    kw = dict(model="tiny", messages=messages, max_tokens=24, temperature=1.0, seed=11, logprobs=True)
    full = oai.chat.completions.create(**kw)
    streamed = [lp.logprob for c in oai.chat.completions.create(**kw, stream=True)
                if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert streamed == [lp.logprob for lp in full.choices[0].logprobs.content]
    assert len(streamed) == full.usage.completion_tokens


def test_openai_completions(oai, offline):
    tok = offline.tokenizer
    r = oai.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=6, temperature=0, logprobs=0)
    ref = offline.generate([tok.encode("The quick brown fox")], SamplingParams(max_new_tokens=6, temperature=0))[0]
    assert r.object == "text_completion" and r.usage.prompt_tokens == len(tok.encode("The quick brown fox"))
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(ref.logprobs, abs=1e-6)

    # a batch of prompts with n=2, streamed: indices are prompt-major, and text matches non-streaming
    kw = dict(model="tiny", prompt=["Hello world", "The sea is"], max_tokens=8, temperature=0.7, n=2, seed=3,
              logprobs=0)
    full = oai.completions.create(**kw)
    assert [c.index for c in full.choices] == [0, 1, 2, 3]
    streamed = {i: "" for i in range(4)}
    finish = {}
    for chunk in oai.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [streamed[i] for i in range(4)] == [c.text for c in full.choices]
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert full.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in full.choices)
    assert full.usage.prompt_tokens == len(tok.encode("Hello world")) + len(tok.encode("The sea is"))

    # stop strings are honoured and trimmed from the text
    base = oai.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0).choices[0].text
    stop = base[3:5]
    assert len(stop) == 2 and "\ufffd" not in stop and base.index(stop) > 0
    cut = oai.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == base[: base.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model="tiny", prompt="Hello", max_tokens=12, temperature=0, stop=[stop], stream=True) if c.choices)
    assert streamed == cut.choices[0].text  # no partial stop string leaks into the stream


# ------------------------------------------------------------------------------------------ bad input


BAD = [
    ("/generate", b"{not json", 400, "malformed JSON"),
    ("/generate", b"", 400, "empty"),
    ("/generate", b"[1, 2]", 400, "expected a JSON object"),
    ("/generate", {"text": 5}, 400, "text"),
    ("/generate", {"input_ids": ["a"]}, 400, "input_ids"),
    ("/generate", {"input_ids": []}, 400, "input_ids: the prompt is empty"),
    ("/generate", {"input_ids": [1, 10**9]}, 400, "outside the vocabulary"),
    ("/generate", {"text": "hi", "input_ids": [1]}, 400, "exactly one of"),
    ("/generate", {"text": "hi", "unknown_field": 1}, 400, "unknown_field: unknown field"),
    ("/generate", {"text": "hi", "sampling_params": {"temprature": 1}}, 400, "sampling_params.temprature"),
    ("/generate", {"text": "hi", "sampling_params": {"temperature": -0.5}}, 400, "sampling_params.temperature"),
    ("/generate", {"text": "hi", "sampling_params": {"temperature": "hot"}}, 400, "sampling_params.temperature"),
    ("/generate", {"text": "hi", "sampling_params": {"top_p": 1.5}}, 400, "sampling_params.top_p"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": -1}}, 400, "max_new_tokens"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 10**6}}, 400, "context length"),
    ("/generate", {"input_ids": list(range(1, CTX + 5))}, 400, "context length"),
    ("/generate", {"text": "hi", "sampling_params": {"repetition_penalty": 1.3}}, 400, "not supported"),
    ("/generate", {"text": "hi", "image_data": "x.png"}, 400, "image_data: not supported"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model: field required"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "bogus": True}, 400, "bogus"),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * CTX}, 400, "context length"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": "2"}, 400, "n"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "max_tokens": CTX * 2}, 400, "context length"),
    ("/update_weights_from_disk", {}, 400, "model_path: field required"),
    ("/pause_generation", {"mode": "sideways"}, 400, "mode"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": ["x"]}, 404, "no route"),
]


def test_bad_inputs_get_400_and_server_keeps_serving(http):
    good = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}
    for path, body, status, needle in BAD:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = http.post(path, headers={"content-type": "application/json"}, **kw)
        assert r.status_code == status, (path, body, r.status_code, r.text)
        msg = r.json()["error"]["message"]
        assert needle.lower() in msg.lower(), (path, body, msg)
        ok = http.post("/generate", json=good)
        assert ok.status_code == 200 and len(ok.json()["output_ids"]) >= 1


def test_openai_client_sees_bad_request(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert "temperature" in str(e.value)
    ok = oai.completions.create(model="tiny", prompt="ok", max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_api_key(server):
    """Same engine behind an app with --api-key: 401 without/with a wrong bearer key; /health stays open."""
    cfg = ServerConfig(model_path="m", served_model_name="tiny", context_len=CTX, vocab_size=512, api_key="s3cret")
    with ServerThread(build_app(server.async_engine, cfg)) as st:
        body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}
        assert httpx.post(st.url + "/generate", json=body, trust_env=False).status_code == 401
        r = httpx.post(st.url + "/generate", json=body, headers={"Authorization": "Bearer nope"}, trust_env=False)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert httpx.get(st.url + "/health", trust_env=False).status_code == 200
        ok = httpx.post(st.url + "/generate", json=body, headers={"Authorization": "Bearer s3cret"}, trust_env=False)
        assert ok.status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=st.url + "/v1", api_key="wrong", max_retries=0).models.list()
        models = openai.OpenAI(base_url=st.url + "/v1", api_key="s3cret", max_retries=0).models.list()
        assert models.data[0].id == "tiny"


def test_stream_disconnect_aborts_request(http, server):
    http.post("/pause_generation", json={"mode": "in_place"})
    try:
        body = {"input_ids": [4, 5, 6], "stream": True, "sampling_params": {"max_new_tokens": 100}}
        with httpx.Client(timeout=30, trust_env=False) as c, c.stream("POST", server.url + "/generate", json=body) as r:
            assert r.status_code == 200  # headers arrive, no event while paused
            _wait(lambda: _inflight(http) == 1, what="queued stream")
        _wait(lambda: _inflight(http) == 0, timeout=10, what="abort after the stream was closed")
    finally:
        http.post("/continue_generation")


def test_engine_step_failure_is_503_and_server_recovers(http, server):
    eng = server.async_engine.engine

    def broken_step():
        raise RuntimeError("injected failure")

    eng.step = broken_step
    try:
        r = http.post("/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 4}})
    finally:
        del eng.step  # back to the class method
    assert r.status_code == 503 and "injected failure" in r.json()["error"]["message"]
    assert http.get("/health").status_code == 200
    good = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}
    ok = http.post("/generate", json=good)
    assert ok.status_code == 200 and len(ok.json()["output_ids"]) == 4


def test_moe_routed_experts_match_offline(tmp_path):
    """R3: `return_routed_experts` returns SGLang's base64 int32 [tokens - 1, layers, topk] = the engine's routing."""
    import base64

    import numpy as np

    ckpt = make_checkpoint(tmp_path / "moe", "qwen3_moe", seed=0)
    prompt = [5, 6, 7, 8]
    sp = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True, return_routed_experts=True)
    ref = _engine(ckpt).generate([prompt], sp)[0]
    st = serve_engine(_engine(ckpt))
    try:
        r = httpx.post(st.url + "/generate", trust_env=False, timeout=60, json={
            "input_ids": prompt, "return_routed_experts": True,
            "sampling_params": {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}}).json()
    finally:
        st.stop()
    assert r["output_ids"] == ref.output_ids
    flat = np.frombuffer(base64.b64decode(r["meta_info"]["routed_experts"]), dtype="<i4")
    assert flat.size == (len(prompt) + 5 - 1) * 2 * 2  # 2 layers, top-2
    np.testing.assert_array_equal(flat.reshape(-1, 2, 2), np.asarray(ref.routed_experts))
    assert flat.min() >= 0 and flat.max() < 8


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    from miles.serve.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "missing")])
    assert e.value.code == 2 and "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path), "--max-num-seqs", "many"])
    assert e.value.code == 2 and "--max-num-seqs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path), "--block-size", "0"])
    assert e.value.code == 2 and "block_size" in capsys.readouterr().err


def test_server_without_tokenizer_serves_ids_only(ckpts):
    eng = LLMEngine(EngineConfig(model=str(ckpts[0]), max_model_len=CTX, load_tokenizer=False))
    st = serve_engine(eng)
    try:
        with httpx.Client(base_url=st.url, timeout=60, trust_env=False) as c:
            r = c.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 3,
                                                                                      "ignore_eos": True}})
            assert r.status_code == 200 and "text" not in r.json() and len(r.json()["output_ids"]) == 3
            bad = c.post("/generate", json={"text": "hi"})
            assert bad.status_code == 400 and "tokenizer" in bad.json()["error"]["message"]
            bad = c.post("/v1/completions", json={"model": "m", "prompt": [1, 2]})
            assert bad.status_code == 400 and "tokenizer" in bad.json()["error"]["message"]
    finally:
        st.stop()


def test_duplicate_rid_is_rejected_without_touching_the_original(http):
    out: list = []
    body = {"input_ids": [1, 2, 3], "rid": "dup", "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}
    http.post("/pause_generation", json={"mode": "in_place"})
    t = threading.Thread(target=lambda: out.append(http.post("/generate", json=body)))
    try:
        t.start()
        _wait(lambda: _inflight(http) == 1, what="first request queued")
        second = http.post("/generate", json=body)
        assert second.status_code == 400 and "dup" in second.json()["error"]["message"]
        assert _inflight(http) == 1
    finally:
        http.post("/continue_generation")
    t.join(30)
    first = out[0].json()
    assert first["meta_info"]["finish_reason"]["type"] == "length" and len(first["output_ids"]) == 4


def test_stalled_engine_gives_504_and_unhealthy_until_it_recovers(http, server):
    aeng, eng = server.async_engine, server.async_engine.engine
    real_step = type(eng).step
    calls = []

    def slow_step():
        if not calls:
            calls.append(1)
            time.sleep(2.0)  # one stuck step
        return real_step(eng)

    aeng.stall_timeout, eng.step = 0.5, slow_step
    health: list = []
    t = threading.Thread(target=lambda: (time.sleep(1.0), health.append(http.get("/health").status_code)))
    try:
        t.start()
        r = http.post("/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 4}})
        t.join(10)
    finally:
        aeng.stall_timeout = 600.0
        del eng.step
    assert r.status_code == 504 and "no progress" in r.json()["error"]["message"]
    assert health == [503]
    _wait(lambda: http.get("/health").status_code == 200, what="healthy again")
    good = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}
    assert len(http.post("/generate", json=good).json()["output_ids"]) == 4
