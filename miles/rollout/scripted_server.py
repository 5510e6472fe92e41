"""A deterministic SGLang-shaped HTTP server for testing generate/rollout hooks without an engine.

`ScriptedServer(respond)` serves `POST /generate` (non-streaming, `input_ids`), `POST /abort_request`
and `GET /health` on 127.0.0.1 from a background thread. `respond(input_ids, sampling_params)`
returns a `ScriptedReply`; a reply with `hold=True` is kept in flight until `/abort_request` and then
returns its first `partial` tokens with `finish_reason.type == "abort"`, as SGLang does.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass
class ScriptedReply:
    output_ids: list[int]
    finish_type: str = "stop"  # stop | length | abort
    matched: Any = None
    hold: bool = False  # wait for /abort_request, then return output_ids[:partial] as aborted
    partial: int = 0
    delay: float = 0.0


def scripted_logprob(token_id: int, position: int) -> float:
    """The log-prob the scripted server reports for a token (deterministic)."""
    return -0.01 * ((token_id * 7 + position) % 50 + 1)


def scripted_routed_experts(num_positions: int, layers: int = 2, topk: int = 2) -> str:
    """SGLang's encoding (base64 little-endian int32 [positions, layers, topk]) of a fixed pattern."""
    import base64

    import numpy as np

    arr = (np.arange(num_positions * layers * topk, dtype="<i4") % 8).reshape(num_positions, layers, topk)
    return base64.b64encode(arr.tobytes()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScriptedServer:
    def __init__(
        self,
        respond: Callable[[list[int], dict], ScriptedReply],
        decode: Callable[[list[int]], str] | None = None,
        weight_version: str = "0",
    ):
        self.respond = respond
        self.decode = decode or (lambda ids: "")
        self.weight_version = weight_version
        self.requests: list[dict] = []
        self.aborts = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._abort: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="scripted-sglang")

    # ---- handlers -------------------------------------------------------------------------
    async def _generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        ids = body.get("input_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            return web.json_response({"error": {"message": "input_ids must be a non-empty int list"}}, status=400)
        params = body.get("sampling_params") or {}
        self.requests.append(body)
        reply = self.respond(ids, params)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        out, finish = list(reply.output_ids), {"type": reply.finish_type, "matched": reply.matched}
        if reply.hold:
            await self._abort.wait()
            out, finish = out[: reply.partial], {"type": "abort", "message": "Abort request", "status_code": None}
        else:
            max_new = params.get("max_new_tokens")
            if max_new is not None and len(out) > max_new:
                out, finish = out[:max_new], {"type": "length", "length": max_new}
        meta = {
            "id": f"req-{len(self.requests)}",
            "finish_reason": finish,
            "prompt_tokens": len(ids),
            "completion_tokens": len(out),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
            "output_token_logprobs": [[scripted_logprob(t, len(ids) + i), t, None] for i, t in enumerate(out)],
        }
        if body.get("return_routed_experts"):
            meta["routed_experts"] = scripted_routed_experts(len(ids) + len(out) - 1)
        return web.json_response({"text": self.decode(out), "output_ids": out, "meta_info": meta})

    async def _abort_request(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("abort_all"):
            self.aborts += 1
            self._abort.set()
        return web.Response(status=200)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    # ---- lifecycle ------------------------------------------------------------------------
    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._abort = asyncio.Event()
        app = web.Application()
        app.router.add_post("/generate", self._generate)
        app.router.add_post("/abort_request", self._abort_request)
        app.router.add_get("/health", self._health)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def reset_abort(self) -> None:
        """Let later held requests wait again (call between rollouts)."""
        self._loop.call_soon_threadsafe(self._abort.clear)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("scripted server did not start within 30 s")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.call_soon_threadsafe(self._abort.set)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
