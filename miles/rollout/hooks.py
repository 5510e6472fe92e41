"""Resolve slime-style hook paths (`package.module.attr`, split on the last dot)."""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import threading
from collections.abc import Callable
from typing import Any


@functools.lru_cache(maxsize=256)
def _load(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"hook path {path!r} must be a dotted path 'package.module.attr'")
    if ":" in path:
        raise ValueError(f"hook path {path!r}: use 'package.module.attr', not 'file.py:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if module_name.startswith("slime."):  # slime's built-ins live at the same paths under miles.
            try:
                return _load("miles." + path[len("slime.") :])
            except (ImportError, AttributeError):
                pass
        msg = f"hook path {path!r}: cannot import module {module_name!r} ({e}); is it on PYTHONPATH?"
        raise ImportError(msg) from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"hook path {path!r}: module {module_name!r} has no attribute {attr!r}") from None


def load_function(path: str | None) -> Any:
    """Import `pkg.mod.attr` and return the attribute (None for an empty path).

    A `slime.…` path that does not import (slime not installed) falls back to the same path under `miles.`,
    so slime's built-in hook paths (filters, data source, rollout function) work unchanged.
    """
    if not path:
        return None
    return _load(path)


async def run_in_daemon_thread(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run a sync `fn` in a fresh daemon thread and await its result.

    Unlike `asyncio.to_thread`, a call that never returns neither blocks the loop's shutdown nor the
    interpreter's exit, so a timed-out hook cannot hang the job.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def target() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            ok, result = False, e
        else:
            ok = True
        try:
            loop.call_soon_threadsafe(deliver, ok, result)
        except RuntimeError:  # loop already closed: nobody is waiting any more
            pass

    threading.Thread(target=target, name=f"hook-{getattr(fn, '__name__', 'fn')}", daemon=True).start()
    return await future


async def call_maybe_async(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Await `fn(*args)` if it is a coroutine function, else run it in a daemon thread."""
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):  # noqa: B004
        return await fn(*args, **kwargs)
    result = await run_in_daemon_thread(fn, *args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


def accepts_kwarg(fn: Callable, name: str) -> bool:
    """True if `fn` has a parameter called `name` (slime passes `evaluation=` only then)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params
