"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE streaming)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from miles.serve.async_engine import GenOutput
from miles.serve.protocol import BadRequest, ChatCompletionRequest, CompletionRequest, parse_body
from miles.serve.state import DISCONNECTED, GenSpec, ServeState, cancel_on_disconnect, new_rid


def _unsupported(req: Any) -> None:
    for name, default in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("logit_bias", None)):
        if getattr(req, name) != default:
            raise BadRequest(f"{name}: not supported by miles serve", param=name)
    if getattr(req, "best_of", None) not in (None, req.n):
        raise BadRequest("best_of: only best_of == n is supported", param="best_of")
    if getattr(req, "suffix", None):
        raise BadRequest("suffix: not supported by miles serve", param="suffix")
    if getattr(req, "tools", None):
        raise BadRequest("tools: tool calling is not supported by miles serve", param="tools")
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.get("type") != "text":
        raise BadRequest("response_format: only {'type': 'text'} is supported", param="response_format")


def _specs(state: ServeState, req: Any, prompts: list[list[int]], field: str, max_tokens: int | None) -> list[GenSpec]:
    specs = []
    for i, prompt in enumerate(prompts):
        state.check_prompt(prompt, f"{field}[{i}]" if len(prompts) > 1 else field)
        name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        mnt = state.max_new_tokens(max_tokens, len(prompt), name, None)
        for j in range(req.n):
            params = state.make_params(
                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, max_new_tokens=mnt,
                min_new_tokens=min(req.min_tokens, mnt), stop=req.stop, stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos, seed=None if req.seed is None else req.seed + j,
                no_stop_trim=req.no_stop_trim, skip_special_tokens=req.skip_special_tokens,
            )
            rid = f"{req.rid}_{i * req.n + j}" if req.rid else new_rid()
            specs.append(GenSpec(list(prompt), params, rid, mnt, skip_special_tokens=req.skip_special_tokens,
                                 spaces_between_special_tokens=req.spaces_between_special_tokens,
                                 no_stop_trim=req.no_stop_trim))
    return specs


def _finish(out: GenOutput) -> str | None:
    return out.finish_reason if out.finished else None


def _usage(specs: list[GenSpec], outs: list[GenOutput], n: int) -> dict:
    prompt = sum(len(s.prompt_ids) for s in specs[::n])
    completion = sum(len(o.output_ids) for o in outs)
    cached = sum(o.cached_tokens for o in outs[::n])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _holdback(text: str, stops: list[str]) -> int:
    """How many trailing chars could be the start of a stop string (not yet safe to stream)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class _Deltas:
    """Turns cumulative snapshots into safe text deltas (holds back partial UTF-8 and partial stop strings)."""

    def __init__(self, state: ServeState, spec: GenSpec):
        self.state, self.spec, self.sent = state, spec, ""
        self.n_tokens = 0
        self.stops = [] if spec.no_stop_trim else list(spec.params.stop or [])

    def update(self, out: GenOutput) -> tuple[bool, str, list[int], list[float]]:
        """(emit?, text delta, token ids and log-probs since the last emitted chunk)."""
        text = self.state.output_text(out, self.spec)
        if not out.finished:
            text = text.rstrip("\ufffd")
            text = text[: len(text) - _holdback(text, self.stops)]
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        if not (delta or out.finished):
            return False, "", [], []
        self.sent = text if len(text) > len(self.sent) else self.sent
        ids, lps = out.output_ids[self.n_tokens:], out.logprobs[self.n_tokens:]
        self.n_tokens = len(out.output_ids)
        return True, delta, ids, lps


def register_openai_routes(app: FastAPI, state: ServeState) -> None:
    cfg = state.cfg

    def token_str(tid: int) -> str:
        return state.token_text(tid)

    def completion_logprobs(ids: list[int], lps: list[float], offset: int) -> dict:
        tokens = [token_str(t) for t in ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": None, "text_offset": offsets}

    def chat_logprobs(ids: list[int], lps: list[float]) -> dict:
        content = []
        for t, lp in zip(ids, lps):
            s = token_str(t)
            content.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []})
        return {"content": content}

    async def run_all(request: Request, specs: list[GenSpec]) -> list[GenOutput] | None:
        from miles.serve.server import gather_or_cancel

        outs = await cancel_on_disconnect(request, gather_or_cancel(*(state.run(s) for s in specs)))
        return None if outs is DISCONNECTED else outs

    async def stream_chunks(specs: list[GenSpec], make_chunk: Any, first_chunk: Any, include_usage: bool,
                            base: dict, n: int) -> AsyncIterator[bytes]:
        from miles.serve.server import SSE_DONE, merge_streams, sse, stream_error_message

        deltas = [_Deltas(state, s) for s in specs]
        finals: dict[int, GenOutput] = {}
        try:
            if first_chunk is not None:
                for k in range(len(specs)):
                    yield sse({**base, "choices": [first_chunk(k)]})
            async with contextlib.aclosing(merge_streams(state, specs)) as events:
                async for k, out in events:
                    emit, delta, ids, lps = deltas[k].update(out)
                    if emit:
                        yield sse({**base, "choices": [make_chunk(k, delta, ids, lps, _finish(out))]})
                    if out.finished:
                        finals[k] = out
            if include_usage:
                outs = [finals[k] for k in sorted(finals)]
                yield sse({**base, "choices": [], "usage": _usage(specs, outs, n)})
        except Exception as e:
            yield sse({"error": {"message": stream_error_message(e), "type": "BadRequestError", "code": 400}})
        yield SSE_DONE

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": cfg.served_model_name, "object": "model", "created": int(state.started), "owned_by": "miles",
                "root": cfg.model_path, "max_model_len": cfg.context_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_body(CompletionRequest, await request.body())
        state.require_tokenizer("the OpenAI endpoints")
        _unsupported(req)
        if req.logprobs:
            raise BadRequest("logprobs: only 0 (the sampled token's log-prob) is supported", param="logprobs")
        if req.echo and req.logprobs is not None:
            raise BadRequest("echo: prompt log-probs are not supported; drop logprobs or echo", param="echo")
        p = req.prompt
        if isinstance(p, str):
            prompts = [state.tokenize(p)]
        elif not p:
            raise BadRequest("prompt: must not be empty", param="prompt")
        elif isinstance(p[0], str):
            prompts = [state.tokenize(s) for s in p]
        elif isinstance(p[0], int):
            prompts = [list(p)]
        else:
            prompts = [list(x) for x in p]
        specs = _specs(state, req, prompts, "prompt", req.max_tokens)
        echo = [state.tokenizer.decode(s.prompt_ids) if req.echo else "" for s in specs]
        want_lp = req.logprobs is not None
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model}
        if req.stream:
            offsets = [len(e) for e in echo]  # text offset of the next chunk, per choice

            def chunk(k: int, delta: str, ids: list[int], lps: list[float], fin: str | None) -> dict:
                lp = completion_logprobs(ids, lps, offsets[k]) if want_lp else None
                offsets[k] += len(delta)
                return {"index": k, "text": delta, "logprobs": lp, "finish_reason": fin}

            def first(k: int) -> dict:
                return {"index": k, "text": echo[k], "logprobs": None, "finish_reason": None}

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = stream_chunks(specs, chunk, first if req.echo else None, include_usage, base, req.n)
            return StreamingResponse(gen, media_type="text/event-stream")
        outs = await run_all(request, specs)
        if outs is None:
            return Response(status_code=499)
        choices = []
        for k, (o, s) in enumerate(zip(outs, specs)):
            text = echo[k] + state.output_text(o, s)
            lp = completion_logprobs(o.output_ids, o.logprobs, len(echo[k])) if want_lp else None
            choices.append({"index": k, "text": text, "logprobs": lp, "finish_reason": o.finish_reason})
        return JSONResponse({**base, "choices": choices, "usage": _usage(specs, outs, req.n)})

    def chat_prompt(req: ChatCompletionRequest) -> list[int]:
        messages = []
        for i, m in enumerate(req.messages):
            d = m.model_dump()
            if isinstance(d["content"], list):
                parts = []
                for part in d["content"]:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise BadRequest(f"messages[{i}].content: only text parts are supported",
                                         param=f"messages[{i}].content")
                    parts.append(part["text"])
                d["content"] = "".join(parts)
            elif d["content"] is None:
                d["content"] = ""
            messages.append(d)
        kwargs = dict(req.chat_template_kwargs or {})
        try:
            text = state.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=req.add_generation_prompt and not
                req.continue_final_message, continue_final_message=req.continue_final_message, **kwargs)
        except Exception as e:  # jinja errors, missing template, bad kwargs
            raise BadRequest(f"messages: the chat template failed: {type(e).__name__}: {e}", "messages") from None
        return list(state.tokenizer.encode(text, add_special_tokens=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_body(ChatCompletionRequest, await request.body())
        state.require_tokenizer("the OpenAI endpoints")
        _unsupported(req)
        if req.top_logprobs:
            raise BadRequest("top_logprobs: top-k alternatives are not supported; use 0", param="top_logprobs")
        prompt = chat_prompt(req)
        specs = _specs(state, req, [prompt], "messages", req.max_completion_tokens or req.max_tokens)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
        if req.stream:
            base["object"] = "chat.completion.chunk"

            def first(k: int) -> dict:
                return {"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}

            def chunk(k: int, delta: str, ids: list[int], lps: list[float], fin: str | None) -> dict:
                lp = chat_logprobs(ids, lps) if req.logprobs else None
                return {"index": k, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                        "finish_reason": fin}

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_chunks(specs, chunk, first, include_usage, base, req.n),
                                     media_type="text/event-stream")
        outs = await run_all(request, specs)
        if outs is None:
            return Response(status_code=499)
        choices = []
        for k, (o, s) in enumerate(zip(outs, specs)):
            choices.append({
                "index": k,
                "message": {"role": "assistant", "content": state.output_text(o, s)},
                "logprobs": chat_logprobs(o.output_ids, o.logprobs) if req.logprobs else None,
                "finish_reason": o.finish_reason,
            })
        usage = _usage(specs, outs, req.n)
        return JSONResponse({**base, "object": "chat.completion", "choices": choices, "usage": usage})
