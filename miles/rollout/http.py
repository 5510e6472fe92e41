"""Async HTTP client for the router/engines: one httpx client per event loop, retries with backoff."""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

import httpx

logger = logging.getLogger(__name__)

_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class HTTPRequestError(RuntimeError):
    """A request that failed for good (4xx, or 5xx/connection errors after all retries)."""


def router_url(args: Any) -> str:
    """`args.router_url` if set, else `http://{sglang_router_ip}:{sglang_router_port}`."""
    url = getattr(args, "router_url", None)
    if url:
        return url.rstrip("/")
    ip, port = getattr(args, "sglang_router_ip", None), getattr(args, "sglang_router_port", None)
    if not ip or not port:
        raise ValueError("no router address: set --router-url or --sglang-router-ip/--sglang-router-port")
    return f"http://{ip}:{port}"


def get_client(trust_env: bool = False) -> httpx.AsyncClient:
    """The httpx client of the running event loop (created on first use).

    `trust_env=False` (router/engines: cluster-internal) ignores HTTP(S)_PROXY; external services
    such as a remote reward model use `trust_env=True`.
    """
    loop = asyncio.get_running_loop()
    clients = _clients.setdefault(loop, {})
    if trust_env not in clients:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        clients[trust_env] = httpx.AsyncClient(limits=limits, timeout=None, trust_env=trust_env)
    return clients[trust_env]


async def close_client() -> None:
    """Close the running loop's clients (call before the loop ends)."""
    for client in _clients.pop(asyncio.get_running_loop(), {}).values():
        await client.aclose()


async def post_json(
    url: str,
    payload: Any,
    *,
    timeout: float = 600.0,
    retries: int = 3,
    backoff: float = 0.5,
    max_backoff: float = 30.0,
    trust_env: bool = False,
) -> Any:
    """POST JSON and return the decoded JSON body (None for an empty body).

    Connection errors, timeouts and 5xx are retried `retries` times with exponential backoff;
    4xx fails at once with the server's message.
    """
    client = get_client(trust_env)
    last: str = ""
    for attempt in range(retries + 1):
        try:
            resp = await client.post(url, json=payload, timeout=timeout)
        except (httpx.TransportError, httpx.TimeoutException) as e:
            last = f"{type(e).__name__}: {e}"
        else:
            if resp.status_code < 400:
                return resp.json() if resp.content else None
            last = f"HTTP {resp.status_code}: {resp.text[:500]}"
            if resp.status_code < 500:
                raise HTTPRequestError(f"POST {url} failed: {last}")
        if attempt < retries:
            delay = min(max_backoff, backoff * 2**attempt)
            logger.warning("POST %s failed (%s); retry %d/%d in %.1fs", url, last, attempt + 1, retries, delay)
            await asyncio.sleep(delay)
    raise HTTPRequestError(f"POST {url} failed after {retries + 1} attempts: {last}")


async def get_json(url: str, *, timeout: float = 30.0) -> Any:
    resp = await get_client().get(url, timeout=timeout)
    resp.raise_for_status()
    return resp.json()
