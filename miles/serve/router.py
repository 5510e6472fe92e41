"""`miles router --worker-urls URL [URL ...]`: spreads both HTTP APIs over `miles serve` workers.

- Picks the healthy worker with the fewest outstanding requests; a routing-key header (default
  `X-SMG-Routing-Key`, as SGLang's gateway) pins a session to one worker (rendezvous hashing over healthy ones).
- Background health checks (GET /health) take a failing worker out and re-admit it once it answers again.
- A request whose worker fails before answering (connection refused/reset, 5xx) is retried on another healthy
  worker, so clients see no error while one healthy worker remains. A broken SSE stream ends with an error event.
- Control endpoints (/abort_request, /pause_generation, weight updates, memory release, ...) fan out to all workers.
- Runtime membership: POST /add_worker, POST /remove_worker (`?url=` or JSON `{"url": ...}`), GET /list_workers;
  gateway style: GET/POST /workers, DELETE /workers/{url}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from miles.serve.protocol import error_body
from miles.serve.state import DISCONNECTED, cancel_on_disconnect

logger = logging.getLogger("miles.router")

FANOUT_PATHS = (
    "/abort_request", "/pause_generation", "/continue_generation", "/update_weights_from_disk",
    "/update_weight_version", "/release_memory_occupation", "/resume_memory_occupation", "/flush_cache",
)
_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive", "content-encoding",
                "upgrade", "te", "trailer", "proxy-authorization", "proxy-connection"}
_RETRY_STATUS = {502, 503}


@dataclass
class Worker:
    url: str
    healthy: bool = False
    outstanding: int = 0
    failures: int = 0
    served: int = 0
    last_error: str | None = None

    def info(self) -> dict:
        return {"url": self.url, "id": self.url, "healthy": self.healthy, "outstanding": self.outstanding,
                "served": self.served, "last_error": self.last_error}


@dataclass
class RouterConfig:
    worker_urls: list[str]
    api_key: str | None = None
    worker_api_key: str | None = None
    routing_key_header: str = "x-smg-routing-key"
    health_path: str = "/health"  # or /health_generate for a real 1-token generation per check
    health_interval: float = 2.0
    health_timeout: float = 3.0
    failure_threshold: int = 2  # consecutive failed checks before a worker is taken out
    connect_timeout: float = 5.0
    request_timeout: float = 3600.0  # read timeout per forwarded request
    wait_for_worker: float = 10.0  # how long a request waits for some worker to become healthy


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url


class NoWorker(Exception):
    pass


class Router:
    """Worker registry, choice policy, health checks and forwarding (owned by the router's FastAPI app)."""

    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg
        self.workers: dict[str, Worker] = {normalize_url(u): Worker(normalize_url(u)) for u in cfg.worker_urls}
        self.client: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task | None = None
        self._rr = 0
        self.num_retries = 0

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        timeout = httpx.Timeout(self.cfg.request_timeout, connect=self.cfg.connect_timeout)
        limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)
        await self.check_all()
        self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self) -> None:
        if self._health_task:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self.client:
            await self.client.aclose()

    # ---------------------------------------------------------------- health
    def _worker_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.cfg.worker_api_key}"} if self.cfg.worker_api_key else {}

    async def check(self, w: Worker) -> bool:
        try:
            r = await self.client.get(w.url + self.cfg.health_path, timeout=self.cfg.health_timeout,
                                      headers=self._worker_headers())
            ok, err = r.status_code == 200, f"{self.cfg.health_path} answered {r.status_code}"
        except httpx.HTTPError as e:
            ok, err = False, f"{type(e).__name__}: {e}"
        if ok:
            if not w.healthy:
                logger.info("worker %s is healthy: admitted", w.url)
            w.healthy, w.failures, w.last_error = True, 0, None
        else:
            w.failures += 1
            w.last_error = err
            if w.healthy and w.failures >= self.cfg.failure_threshold:
                logger.warning("worker %s failed %d health checks (%s): taken out", w.url, w.failures, err)
                w.healthy = False
        return ok

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in list(self.workers.values())))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval)
            try:
                await self.check_all()
            except Exception:  # never let the loop die
                logger.exception("health check round failed")

    def mark_failed(self, w: Worker, err: str) -> None:
        if w.healthy:
            logger.warning("worker %s failed a request (%s): taken out until healthy", w.url, err)
        w.healthy, w.last_error = False, err

    # ---------------------------------------------------------------- choice
    def choose(self, key: str | None, exclude: set[str]) -> Worker | None:
        cands = [w for w in self.workers.values() if w.healthy and w.url not in exclude]
        if not cands:
            return None
        if key:
            return max(cands, key=lambda w: hashlib.blake2b(f"{key}|{w.url}".encode(), digest_size=8).digest())
        self._rr += 1
        n = len(cands)
        return min(enumerate(cands), key=lambda iw: (iw[1].outstanding, (iw[0] - self._rr) % n))[1]

    async def choose_wait(self, key: str | None, exclude: set[str]) -> Worker:
        deadline = time.monotonic() + self.cfg.wait_for_worker
        while True:
            w = self.choose(key, exclude)
            if w is not None:
                return w
            if time.monotonic() >= deadline or (exclude and len(exclude) >= len(self.workers)):
                raise NoWorker("no healthy worker is available")
            await asyncio.sleep(0.2)

    # ---------------------------------------------------------------- forwarding
    def _forward_headers(self, request: Request) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        if self.cfg.api_key:
            headers.pop("authorization", None)
        headers.update(self._worker_headers())
        return headers

    async def forward(self, request: Request, path: str, body: bytes) -> Response:
        """Send the request to one worker, retrying on another if the worker fails before answering."""
        headers = self._forward_headers(request)
        key = request.headers.get(self.cfg.routing_key_header)
        tried: set[str] = set()
        last_err = "no healthy worker is available"
        while True:
            try:
                w = await self.choose_wait(key, tried)
            except NoWorker:
                return JSONResponse(error_body(f"no healthy worker could serve the request: {last_err}", 503),
                                    status_code=503)
            tried.add(w.url)
            w.outstanding += 1
            release = True
            try:
                req = self.client.build_request(request.method, w.url + path, content=body, headers=headers,
                                                params=request.query_params)
                resp = await self.client.send(req, stream=True)
                if resp.status_code in _RETRY_STATUS:
                    text = (await resp.aread()).decode(errors="replace")[:300]
                    await resp.aclose()
                    last_err = f"{w.url} answered {resp.status_code}: {text}"
                    self.mark_failed(w, last_err)
                    self.num_retries += 1
                    continue
                ctype = resp.headers.get("content-type", "")
                out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS}
                out_headers["x-miles-worker"] = w.url
                if ctype.startswith("text/event-stream"):
                    release = False
                    return StreamingResponse(self._relay(w, resp), status_code=resp.status_code,
                                             headers=out_headers, media_type="text/event-stream")
                content = await resp.aread()
                await resp.aclose()
                w.served += 1
                return Response(content, status_code=resp.status_code, headers=out_headers)
            except (httpx.TransportError, httpx.RemoteProtocolError) as e:
                if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
                    return JSONResponse(error_body(f"worker {w.url} timed out: {type(e).__name__}", 504),
                                        status_code=504)
                last_err = f"{w.url}: {type(e).__name__}: {e}"
                self.mark_failed(w, last_err)
                self.num_retries += 1
            finally:
                if release:
                    w.outstanding -= 1

    async def _relay(self, w: Worker, resp: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
            w.served += 1
        except httpx.HTTPError as e:
            self.mark_failed(w, f"stream broke: {type(e).__name__}: {e}")
            msg = {"error": {"message": f"worker {w.url} failed mid-stream: {type(e).__name__}", "code": 502}}
            yield b"data: " + json.dumps(msg).encode() + b"\n\ndata: [DONE]\n\n"
        finally:
            w.outstanding -= 1
            await resp.aclose()

    async def fanout(self, request: Request, path: str, body: bytes) -> Response:
        """Send the request to every worker (healthy ones, plus all for aborts); the worst status wins."""
        headers = self._forward_headers(request)
        targets = [w for w in self.workers.values() if w.healthy or path == "/abort_request"]
        if not targets:
            return JSONResponse(error_body("no healthy worker", 503), status_code=503)

        async def one(w: Worker) -> tuple[int, bytes, str]:
            try:
                timeout = 30.0 if path == "/abort_request" else httpx.USE_CLIENT_DEFAULT
                r = await self.client.request(request.method, w.url + path, content=body, headers=headers,
                                              params=request.query_params, timeout=timeout)
                return r.status_code, r.content, r.headers.get("content-type", "application/json")
            except httpx.HTTPError as e:
                err = error_body(f"{w.url}: {type(e).__name__}: {e}", 502)
                return 502, json.dumps(err).encode(), "application/json"

        results = await asyncio.gather(*(one(w) for w in targets))
        if path == "/abort_request":  # best effort on every worker: dead ones have nothing to abort
            ok = [r for r in results if r[0] < 400]
            results = ok or results
        status, content, ctype = max(results, key=lambda r: r[0])
        return Response(content, status_code=status, media_type=ctype)

    # ---------------------------------------------------------------- membership
    async def add(self, url: str) -> Worker:
        url = normalize_url(url)
        w = self.workers.setdefault(url, Worker(url))
        await self.check(w)
        return w

    def remove(self, url: str) -> bool:
        return self.workers.pop(normalize_url(url), None) is not None


async def _url_arg(request: Request) -> str | None:
    url = request.query_params.get("url")
    if url:
        return url
    raw = await request.body()
    if raw.strip():
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            return None
        if isinstance(obj, dict) and isinstance(obj.get("url"), str):
            return obj["url"]
    return None


def build_router_app(cfg: RouterConfig) -> FastAPI:
    """The router's FastAPI app (starts health checks on startup)."""
    router = Router(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    app = FastAPI(title="miles router", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.router = router
    if cfg.api_key:
        from miles.serve.server import ApiKeyMiddleware

        app.add_middleware(ApiKeyMiddleware, api_key=cfg.api_key)

    @app.get("/health")
    async def health() -> JSONResponse:
        n = sum(w.healthy for w in router.workers.values())
        return JSONResponse({"status": "ok", "healthy_workers": n, "workers": len(router.workers)})

    @app.get("/list_workers")
    async def list_workers() -> dict:
        ws = list(router.workers.values())
        return {"urls": [w.url for w in ws], "healthy_urls": [w.url for w in ws if w.healthy],
                "workers": [w.info() for w in ws], "num_retries": router.num_retries}

    @app.get("/workers")
    async def workers() -> dict:
        return {"workers": [w.info() for w in router.workers.values()]}

    @app.post("/workers")  # SGLang model gateway style registration
    async def register_worker(request: Request) -> JSONResponse:
        return await add_worker(request)

    @app.delete("/workers/{worker_id:path}")
    async def delete_worker(worker_id: str) -> JSONResponse:
        if not router.remove(worker_id):
            return JSONResponse(error_body(f"no worker {normalize_url(worker_id)!r}", 404, "url"), 404)
        return JSONResponse({"success": True})

    @app.post("/add_worker")
    async def add_worker(request: Request) -> JSONResponse:
        url = await _url_arg(request)
        if not url:
            return JSONResponse(error_body("url: required (?url=... or JSON {\"url\": ...})", 400, "url"), 400)
        w = await router.add(url)
        return JSONResponse({"success": True, "worker": w.info()})

    @app.post("/remove_worker")
    async def remove_worker(request: Request) -> JSONResponse:
        url = await _url_arg(request)
        if not url:
            return JSONResponse(error_body("url: required (?url=... or JSON {\"url\": ...})", 400, "url"), 400)
        if not router.remove(url):
            return JSONResponse(error_body(f"url: no worker {normalize_url(url)!r}", 404, "url"), 404)
        return JSONResponse({"success": True})

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def proxy(request: Request, path: str) -> Response:
        path = "/" + path
        body = await request.body()  # read fully before watching for a disconnect
        if path in FANOUT_PATHS:
            return await router.fanout(request, path, body)
        resp = await cancel_on_disconnect(request, router.forward(request, path, body))
        return Response(status_code=499) if resp is DISCONNECTED else resp

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="miles router", description="Load-balancing router for `miles serve` workers.")
    p.add_argument("--worker-urls", nargs="*", default=[], help="worker base URLs (more via POST /add_worker)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=30080)
    p.add_argument("--api-key", default=os.environ.get("MILES_API_KEY"), help="require 'Authorization: Bearer KEY'")
    p.add_argument("--worker-api-key", default=None, help="bearer key sent to the workers")
    p.add_argument("--routing-key-header", default="X-SMG-Routing-Key", help="header naming a session (affinity)")
    p.add_argument("--health-interval", type=float, default=2.0, help="seconds between health-check rounds")
    p.add_argument("--health-failure-threshold", type=int, default=2, help="failed checks before removal")
    p.add_argument("--health-path", default="/health", help="worker endpoint polled by health checks")
    p.add_argument("--health-timeout", type=float, default=3.0, help="seconds before a health check fails")
    p.add_argument("--request-timeout", type=float, default=3600.0, help="read timeout per forwarded request (s)")
    p.add_argument("--wait-for-worker", type=float, default=10.0,
                   help="seconds a request waits for a healthy worker before 503")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = RouterConfig(
        worker_urls=args.worker_urls, api_key=args.api_key, worker_api_key=args.worker_api_key,
        routing_key_header=args.routing_key_header.lower(), health_interval=args.health_interval,
        health_path=args.health_path, health_timeout=args.health_timeout,
        failure_threshold=args.health_failure_threshold, request_timeout=args.request_timeout,
        wait_for_worker=args.wait_for_worker,
    )
    import uvicorn

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("binding %s without --api-key: anyone who can reach this port can use it", args.host)

    logger.info("miles router: http://%s:%d over %d worker(s)", args.host, args.port, len(cfg.worker_urls))
    uvicorn.run(build_router_app(cfg), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
