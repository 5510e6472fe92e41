"""`ServeState`: what both HTTP APIs share — prompt checks against the context, engine sampling params,
running one request to completion or as a stream, and detokenization with SGLang's stop-trim rules."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from miles.serve.async_engine import AsyncEngine, GenOutput
from miles.serve.protocol import BadRequest


@dataclass
class ServerConfig:
    """Static facts the HTTP layer needs about the served model."""

    model_path: str
    served_model_name: str
    context_len: int
    vocab_size: int
    api_key: str | None = None
    default_max_new_tokens: int = 128  # SGLang's default when a request leaves max_new_tokens unset
    health_timeout: float = 20.0


@dataclass
class GenSpec:
    """One generation to run, in engine terms plus the output options of its API."""

    prompt_ids: list[int]
    params: Any  # miles.engine.SamplingParams
    rid: str
    max_new_tokens: int
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    return_logprob: bool = False
    return_text_in_logprobs: bool = False
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0


def new_rid() -> str:
    return uuid.uuid4().hex


def engine_context_len(engine: Any) -> int:
    """The longest prompt + output the engine accepts (`engine.max_model_len`, else config / model limits)."""
    for owner in (engine, getattr(engine, "config", None)):
        v = getattr(owner, "max_model_len", None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(getattr(getattr(engine, "model", None), "config", None), "max_position_embeddings", None)
    return int(v) if v else 4096


def engine_vocab_size(engine: Any) -> int:
    """Valid token ids are [0, vocab): the model's embedding size (may exceed the tokenizer's length)."""
    v = getattr(getattr(getattr(engine, "model", None), "config", None), "vocab_size", None)
    return int(v) if v else len(engine.tokenizer)


class ServeState:
    """Glue between request bodies and the `AsyncEngine` (owned by the FastAPI app)."""

    def __init__(self, engine: AsyncEngine, cfg: ServerConfig):
        self.engine = engine
        self.cfg = cfg
        self.tokenizer = engine.tokenizer
        self.started = time.time()
        self.version_labels: dict[Any, str] = {}  # engine weight version -> label set by a client

    # ---------------------------------------------------------------- weight version labels
    def version_label(self, v: Any = None) -> str:
        if v is None:
            v = self.engine.engine.weight_version
        return self.version_labels.get(v, str(v))

    def set_version_label(self, label: Any) -> None:
        self.version_labels[self.engine.engine.weight_version] = str(label)

    # ---------------------------------------------------------------- prompts and params
    def tokenize(self, text: str) -> list[int]:
        self.require_tokenizer("text prompts")
        return list(self.tokenizer.encode(text))

    def require_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise BadRequest(f"{what} need a tokenizer, and this server runs without one; send input_ids")

    def check_prompt(self, ids: list[int], field: str) -> None:
        if not ids:
            raise BadRequest(f"{field}: the prompt is empty", param=field)
        bad = next((t for t in ids if not 0 <= t < self.cfg.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"{field}: token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})", field)
        if len(ids) >= self.cfg.context_len:
            raise BadRequest(
                f"{field}: the prompt has {len(ids)} tokens, which does not fit the model's context length "
                f"of {self.cfg.context_len} (at least one token must be generated)",
                param=field,
            )

    def max_new_tokens(self, requested: int | None, prompt_len: int, field: str, default: int | None) -> int:
        room = self.cfg.context_len - prompt_len
        if requested is None:
            return min(default or room, room)
        if requested > room:
            raise BadRequest(
                f"{field}: {requested} new tokens + {prompt_len} prompt tokens exceed the model's context length "
                f"of {self.cfg.context_len} (at most {room} new tokens fit)",
                param=field,
            )
        return requested

    def make_params(self, **kw: Any) -> Any:
        """An engine `SamplingParams` from SGLang-style values (temperature < 1e-6 → greedy)."""
        from miles.engine import SamplingParams

        if kw.get("temperature", 1.0) < 1e-6:
            kw["temperature"] = 0.0
        names = {f.name for f in dataclasses.fields(SamplingParams)}
        try:
            return SamplingParams(**{k: v for k, v in kw.items() if k in names})
        except ValueError as e:
            raise BadRequest(f"sampling params: {e}") from None

    # ---------------------------------------------------------------- running
    async def stream(self, spec: GenSpec, progress: bool = True) -> AsyncIterator[GenOutput]:
        """Progress snapshots of one request (`progress=False`: only the final one); closing early aborts it.
        max_new_tokens == 0 finishes at once."""
        if spec.max_new_tokens == 0:
            yield GenOutput(spec.rid, len(spec.prompt_ids), [], [], True, "length",
                            weight_version=self.engine.engine.weight_version)
            return
        try:
            gen = self.engine.generate(spec.prompt_ids, spec.params, spec.rid, progress=progress)
        except ValueError as e:
            raise BadRequest(str(e), param="rid") from None
        async with contextlib.aclosing(gen):
            try:
                async for out in gen:
                    yield out
            except ValueError as e:  # duplicate rid or parameters the engine rejected
                raise BadRequest(str(e)) from None

    async def run(self, spec: GenSpec) -> GenOutput:
        last = None
        async with contextlib.aclosing(self.stream(spec, progress=False)) as gen:
            async for out in gen:
                last = out
        assert last is not None and last.finished
        return last

    # ---------------------------------------------------------------- detokenization
    def decode(self, ids: list[int], spec: GenSpec) -> str:
        kw = {"skip_special_tokens": spec.skip_special_tokens}
        if not spec.spaces_between_special_tokens:
            kw["spaces_between_special_tokens"] = False
        return self.tokenizer.decode(ids, **kw)

    def output_text(self, out: GenOutput, spec: GenSpec) -> str:
        """Generated text; unless `no_stop_trim`, a matched stop token or stop string is cut off (SGLang rule)."""
        if self.tokenizer is None:
            return ""
        ids = out.output_ids
        trim = out.finished and out.finish_reason == "stop" and not spec.no_stop_trim
        if trim and isinstance(out.matched_stop, int) and ids and ids[-1] == out.matched_stop:
            ids = ids[:-1]
        text = self.decode(ids, spec)
        if trim and isinstance(out.matched_stop, str):
            idx = text.find(out.matched_stop)
            if idx >= 0:
                text = text[:idx]
        return text

    def token_text(self, tid: int) -> str:
        return self.tokenizer.decode([tid], skip_special_tokens=False) if self.tokenizer is not None else None

    # ---------------------------------------------------------------- SGLang response
    def sglang_result(self, out: GenOutput, spec: GenSpec, text: str | None = None, t0: float | None = None) -> dict:
        """`{"text", "output_ids", "meta_info"}` exactly as SGLang shapes it (see reference/sglang-http.md §3)."""
        meta: dict[str, Any] = {
            "id": spec.rid,
            "finish_reason": finish_reason(out),
            "prompt_tokens": out.prompt_len,
            "completion_tokens": len(out.output_ids),
            "cached_tokens": out.cached_tokens,
            "weight_version": self.version_label(out.weight_version),
            "num_retractions": out.num_preemptions,
        }
        if spec.return_logprob:
            tt = spec.return_text_in_logprobs
            meta["output_token_logprobs"] = [
                [lp, tid, self.token_text(tid) if tt else None] for lp, tid in zip(out.logprobs, out.output_ids)
            ]
            meta["output_token_logprobs_length"] = len(out.output_ids)
        if spec.return_routed_experts and out.finished and out.routed_experts is not None:
            meta["routed_experts"] = encode_routed_experts(out.routed_experts, spec.routed_experts_start_len)
        if out.finished and t0 is not None:
            meta["e2e_latency"] = time.monotonic() - t0
        res = {"text": self.output_text(out, spec) if text is None else text, "output_ids": out.output_ids,
               "meta_info": meta}
        if self.tokenizer is None:  # like SGLang's --skip-tokenizer-init: ids only
            del res["text"]
        return res


def finish_reason(out: GenOutput) -> dict | None:
    if not out.finished:
        return None
    if out.finish_reason == "stop":
        return {"type": "stop", "matched": out.matched_stop}
    if out.finish_reason == "length":
        return {"type": "length", "length": len(out.output_ids)}
    return {"type": "abort", "message": out.abort_message or "aborted", "status_code": None, "err_type": None}


def encode_routed_experts(routed: Any, start: int = 0) -> str:
    """base64 of little-endian int32 `[tokens, layers, topk]` from position `start` (SGLang's encoding)."""
    import numpy as np

    arr = np.asarray(routed.tolist() if hasattr(routed, "tolist") else routed, dtype="<i4")
    return base64.b64encode(arr[start:].tobytes()).decode()


DISCONNECTED = object()


async def wait_disconnect(request: Any) -> None:
    """Return when the HTTP client disconnects (call only after the body was read; costs nothing meanwhile)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


async def cancel_on_disconnect(request: Any, coro: Any) -> Any:
    """Await `coro`; if the HTTP client goes away first, cancel it (aborting its engine requests) and return
    `DISCONNECTED`. The request body must have been read already."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return DISCONNECTED
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
