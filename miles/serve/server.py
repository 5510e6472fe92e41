"""`build_app`: the FastAPI app of `miles serve` — SGLang's native API (this file) plus the OpenAI API
(`openai_api.py`) over one `AsyncEngine`. Error bodies: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from miles.serve.async_engine import AsyncEngine, EngineError, GenerationStalled
from miles.serve.protocol import (
    UNSUPPORTED_GENERATE,
    UNSUPPORTED_SAMPLING,
    AbortRequest,
    BadRequest,
    ContinueRequest,
    GenerateRequest,
    MemoryRequest,
    PauseRequest,
    SGLSamplingParams,
    UpdateWeightsFromDiskRequest,
    UpdateWeightVersionRequest,
    error_body,
    parse_body,
    validate,
)
from miles.serve.state import DISCONNECTED, GenSpec, ServerConfig, ServeState, cancel_on_disconnect, new_rid

logger = logging.getLogger(__name__)


def error_response(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status)


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class ApiKeyMiddleware:
    """Pure-ASGI bearer-key check (keeps streaming and disconnect detection intact). `/health` stays open."""

    def __init__(self, app: Any, api_key: str, open_paths: tuple[str, ...] = ("/health",)):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = open_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        if not secrets.compare_digest(auth, self.expected):
            resp = error_response("missing or invalid API key: send 'Authorization: Bearer <key>'", 401)
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


async def gather_or_cancel(*coros: Any) -> list[Any]:
    """Like `asyncio.gather`, but the first failure cancels the siblings (aborting their requests)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)


async def merge_streams(state: ServeState, specs: list[GenSpec]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave the progress of several requests as `(index, GenOutput)`; an error is raised in order.

    Snapshots are cumulative, so a slow reader gets the latest one per request (bounded memory)."""
    ready: asyncio.Queue = asyncio.Queue()  # indices with a new snapshot, an error, or done
    latest: dict[int, Any] = {}

    def publish(k: int, item: Any) -> None:
        if k not in latest:
            ready.put_nowait(k)
        latest[k] = item

    async def pump(k: int, spec: GenSpec) -> None:
        try:
            async with contextlib.aclosing(state.stream(spec)) as gen:
                async for out in gen:
                    publish(k, out)
                    if out.finished:
                        return
            publish(k, EngineError(f"request {spec.rid} ended without a final output"))
        except Exception as e:
            publish(k, e)

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(specs)]
    remaining = len(tasks)
    try:
        while remaining:
            k = await ready.get()  # each producer has its own stall timeout inside AsyncEngine.generate
            item = latest.pop(k)
            if isinstance(item, Exception):
                raise item
            if item.finished:
                remaining -= 1
            yield k, item
    finally:
        for t in tasks:
            t.cancel()


def stream_error_message(e: Exception) -> str:
    return e.message if isinstance(e, BadRequest) else f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------------ /generate


def _per_item(value: Any, n: int, name: str, default: Any) -> list[Any]:
    if value is None:
        return [default] * n
    if isinstance(value, list):
        if len(value) != n:
            raise BadRequest(f"{name}: expected {n} values (one per prompt), got {len(value)}", param=name)
        return value
    return [value] * n


def build_generate_specs(state: ServeState, req: GenerateRequest) -> tuple[list[GenSpec], bool]:
    """Validate a /generate body into one `GenSpec` per (prompt, sample); returns (specs, response_is_list)."""
    for name in UNSUPPORTED_GENERATE:
        if getattr(req, name) not in (None, False):
            raise BadRequest(f"{name}: not supported by miles serve", param=name)
    if (req.text is None) == (req.input_ids is None):
        raise BadRequest("exactly one of 'text' or 'input_ids' is required", param="text")
    if req.text is not None:
        field, is_batch = "text", isinstance(req.text, list)
        prompts = [state.tokenize(t) for t in (req.text if is_batch else [req.text])]
    else:
        ids = req.input_ids
        field, is_batch = "input_ids", bool(ids) and isinstance(ids[0], list)
        prompts = ids if is_batch else [ids]
    if is_batch and not prompts:
        raise BadRequest(f"{field}: the batch is empty", param=field)
    for i, p in enumerate(prompts):
        state.check_prompt(p, f"{field}[{i}]" if is_batch else field)
    nb = len(prompts)

    raw_sp = req.sampling_params
    if isinstance(raw_sp, list) and not is_batch:
        raise BadRequest("sampling_params: a list is only allowed with a batch of prompts", "sampling_params")
    raw_list = _per_item(raw_sp, nb, "sampling_params", {})
    sps = [
        validate(SGLSamplingParams, d, "sampling_params" + (f"[{i}]" if isinstance(raw_sp, list) else ""))
        for i, d in enumerate(raw_list)
    ]
    for sp in sps:
        for name, default in UNSUPPORTED_SAMPLING.items():
            if getattr(sp, name) != default:
                raise BadRequest(f"sampling_params.{name}: not supported by miles serve", f"sampling_params.{name}")
    n = sps[0].n
    if any(sp.n != n for sp in sps):
        raise BadRequest("sampling_params.n: must be equal across a batch", "sampling_params.n")

    want_lp = _per_item(req.return_logprob, nb, "return_logprob", False)
    start_len = _per_item(req.logprob_start_len, nb, "logprob_start_len", -1)
    top_num = _per_item(req.top_logprobs_num, nb, "top_logprobs_num", 0)
    for i in range(nb):
        if want_lp[i] and start_len[i] not in (-1, None) and start_len[i] < len(prompts[i]):
            raise BadRequest("logprob_start_len: prompt (input) log-probs are not supported; use -1",
                             "logprob_start_len")
        if top_num[i]:
            raise BadRequest("top_logprobs_num: top-k alternatives are not supported; use 0", "top_logprobs_num")
    if req.token_ids_logprob is not None:
        raise BadRequest("token_ids_logprob: not supported by miles serve", "token_ids_logprob")
    if req.return_routed_experts and any(req.routed_experts_start_len > len(p) for p in prompts):
        raise BadRequest("routed_experts_start_len: must be <= the prompt length", "routed_experts_start_len")

    total = nb * n
    if req.rid is None:
        rids = [new_rid() for _ in range(total)]
    elif isinstance(req.rid, str):
        rids = [req.rid] if total == 1 else [f"{req.rid}_{k}" for k in range(total)]
    else:
        if not is_batch or len(req.rid) != nb:
            raise BadRequest(f"rid: a list of rids must have one per prompt ({nb})", "rid")
        if len(set(req.rid)) != nb:
            raise BadRequest("rid: rids must be unique", "rid")
        rids = list(req.rid) if n == 1 else [f"{r}_{j}" for r in req.rid for j in range(n)]

    specs = []
    for i, (prompt, sp) in enumerate(zip(prompts, sps)):
        mnt_field = "sampling_params" + (f"[{i}]" if isinstance(raw_sp, list) else "") + ".max_new_tokens"
        mnt = state.max_new_tokens(sp.max_new_tokens, len(prompt), mnt_field, state.cfg.default_max_new_tokens)
        for j in range(n):
            seed = None if sp.sampling_seed is None else sp.sampling_seed + j
            params = state.make_params(
                temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, max_new_tokens=max(mnt, 1),
                min_new_tokens=min(sp.min_new_tokens, mnt), stop=sp.stop, stop_token_ids=sp.stop_token_ids,
                ignore_eos=sp.ignore_eos, seed=seed, return_routed_experts=req.return_routed_experts,
                no_stop_trim=sp.no_stop_trim, skip_special_tokens=sp.skip_special_tokens,
            )
            specs.append(GenSpec(
                prompt_ids=list(prompt), params=params, rid=rids[i * n + j], max_new_tokens=mnt,
                skip_special_tokens=sp.skip_special_tokens,
                spaces_between_special_tokens=sp.spaces_between_special_tokens, no_stop_trim=sp.no_stop_trim,
                return_logprob=bool(want_lp[i]), return_text_in_logprobs=req.return_text_in_logprobs,
                return_routed_experts=req.return_routed_experts,
                routed_experts_start_len=req.routed_experts_start_len,
            ))
    return specs, is_batch or n > 1


# ------------------------------------------------------------------------------------------------ the app


def build_app(engine: AsyncEngine, cfg: ServerConfig) -> FastAPI:
    """The `miles serve` FastAPI app over a running `AsyncEngine`."""
    from miles.serve.openai_api import register_openai_routes

    state = ServeState(engine, cfg)
    app = FastAPI(title="miles serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    if cfg.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=cfg.api_key)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(msg, e.status_code)

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, e: BadRequest) -> JSONResponse:
        return error_response(e.message, e.status, e.param)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, e: EngineError) -> JSONResponse:
        return error_response(f"engine error: {e}", 503)

    @app.exception_handler(GenerationStalled)
    async def _stalled(request: Request, e: GenerationStalled) -> JSONResponse:
        return error_response(str(e), 504)

    @app.exception_handler(asyncio.TimeoutError)
    async def _timeout(request: Request, e: Exception) -> JSONResponse:
        return error_response("timed out waiting for the engine", 504)

    # ---------------------------------------------------------------- generation
    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Response:
        req = parse_body(GenerateRequest, await request.body())
        specs, as_list = build_generate_specs(state, req)
        t0 = time.monotonic()
        if req.stream:
            return StreamingResponse(_stream_generate(specs, as_list, t0), media_type="text/event-stream")
        outs = await cancel_on_disconnect(request, gather_or_cancel(*(state.run(s) for s in specs)))
        if outs is DISCONNECTED:
            return Response(status_code=499)
        results = [state.sglang_result(o, s, t0=t0) for o, s in zip(outs, specs)]
        return JSONResponse(results if as_list else results[0])

    async def _stream_generate(specs: list[GenSpec], as_list: bool, t0: float) -> AsyncIterator[bytes]:
        try:
            async with contextlib.aclosing(merge_streams(state, specs)) as events:
                async for k, out in events:
                    text = state.output_text(out, specs[k])
                    if not out.finished:
                        text = text.rstrip("\ufffd")  # hold back an incomplete UTF-8 character
                    res = state.sglang_result(out, specs[k], text=text, t0=t0)
                    if as_list:
                        res["index"] = k
                    yield sse(res)
        except Exception as e:
            yield sse({"error": {"message": stream_error_message(e)}})
        yield SSE_DONE

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        req = parse_body(AbortRequest, await request.body(), allow_empty=True)
        if req.abort_all:
            await engine.abort_all(req.abort_message or "aborted by /abort_request")
        elif req.rid:
            await engine.abort_request(req.rid, req.abort_message or "aborted by /abort_request")
        return Response(status_code=200)

    # ---------------------------------------------------------------- health and info
    @app.get("/health")
    async def health() -> Response:
        """Cheap liveness: the engine thread runs and is not stuck with work waiting."""
        if not engine.alive:
            return error_response(f"engine is not running: {engine.error!r}", 503)
        if engine.stalled:
            return error_response(f"engine made no progress for {engine.stall_timeout:.0f}s with requests waiting",
                                  503)
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        if not engine.alive:
            return error_response(f"engine is not running: {engine.error!r}", 503)
        if engine.paused or engine.asleep or (engine.num_inflight and time.monotonic() - engine.last_step_time < 5):
            return Response(status_code=200)  # already producing output, or deliberately idle
        spec = GenSpec([0], state.make_params(temperature=0.0, max_new_tokens=1), f"health_{new_rid()}", 1)
        try:
            await asyncio.wait_for(state.run(spec), cfg.health_timeout)
        except (asyncio.TimeoutError, EngineError) as e:
            return error_response(f"health generation failed: {type(e).__name__}: {e}", 503)
        return Response(status_code=200)

    def model_info() -> dict:
        return {
            "model_path": cfg.model_path,
            "tokenizer_path": cfg.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": state.version_label(),
            "served_model_name": cfg.served_model_name,
            "context_length": cfg.context_len,
            "vocab_size": cfg.vocab_size,
        }

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def get_model_info() -> dict:
        return model_info()

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info() -> dict:
        stats = await engine.stats_async()
        return {
            **model_info(),
            "version": "miles",
            "server_args": {"model_path": cfg.model_path, "context_length": cfg.context_len,
                            "served_model_name": cfg.served_model_name},
            "internal_states": [stats],
            "stats": stats,
            "uptime_s": time.time() - state.started,
        }

    @app.get("/stats")
    async def stats() -> dict:
        return await engine.stats_async()

    @app.get("/get_weight_version")
    async def get_weight_version() -> dict:
        return {"weight_version": state.version_label()}

    # ---------------------------------------------------------------- control
    @app.post("/pause_generation")
    async def pause_generation(request: Request) -> dict:
        req = parse_body(PauseRequest, await request.body(), allow_empty=True)
        n = await engine.pause(req.mode)
        return {"message": "Generation paused successfully.", "status": "ok", "num_aborted_requests": n}

    @app.post("/continue_generation")
    async def continue_generation(request: Request) -> dict:
        parse_body(ContinueRequest, await request.body(), allow_empty=True)
        await engine.resume()
        return {"message": "Generation continued successfully.", "status": "ok"}

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> JSONResponse:
        req = parse_body(UpdateWeightsFromDiskRequest, await request.body())
        n_inflight = engine.num_inflight
        label = None if req.weight_version is None else str(req.weight_version)
        version = int(label) if label is not None and label.lstrip("-").isdigit() else None
        try:
            await engine.update_weights_from_disk(req.model_path, version, abort_all=req.abort_all_requests)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            if isinstance(e, EngineError):
                raise
            msg = f"failed to update weights from {req.model_path!r}: {type(e).__name__}: {e}"
            return JSONResponse({"success": False, "message": msg, "num_paused_requests": 0}, status_code=400)
        if label is not None and version is None:
            state.set_version_label(label)
        return JSONResponse({"success": True, "message": f"Succeeded to update model weights from {req.model_path}.",
                             "num_paused_requests": n_inflight, "weight_version": state.version_label()})

    @app.post("/update_weight_version")
    async def update_weight_version(request: Request) -> dict:
        req = parse_body(UpdateWeightVersionRequest, await request.body())
        if req.abort_all_requests:
            await engine.abort_all("aborted by /update_weight_version")
        state.set_version_label(req.new_version)
        return {"success": True, "message": "weight version updated", "new_version": state.version_label()}

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    async def release_memory_occupation(request: Request) -> JSONResponse:
        parse_body(MemoryRequest, await request.body(), allow_empty=True)
        await engine.sleep()
        return JSONResponse(None)

    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def resume_memory_occupation(request: Request) -> JSONResponse:
        parse_body(MemoryRequest, await request.body(), allow_empty=True)
        await engine.wake_up()
        return JSONResponse(None)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        if engine.num_inflight:
            return PlainTextResponse("Cache not flushed: requests are running or waiting.", status_code=400)
        flush = getattr(engine.engine, "flush_cache", None)
        if flush is not None and await engine.call(lambda e: e.flush_cache()) is False:
            return PlainTextResponse("Cache not flushed: requests are running or waiting.", status_code=400)
        return PlainTextResponse("Cache flushed.")

    register_openai_routes(app, state)
    return app
