"""`AsyncEngine`: drives the single-threaded `LLMEngine` from one background thread for asyncio servers.

Threading model
- Exactly one thread (``miles-engine``) ever touches the engine. It drains a command queue (add request, abort,
  pause, weight update, sleep, ...) and then runs ``engine.step()`` while there is unfinished work and
  generation is neither paused nor asleep. Commands therefore always apply *between* steps.
- Each request has an ``asyncio.Queue`` on the event loop that submitted it; the engine thread hands snapshots
  of the request's progress over with ``loop.call_soon_threadsafe``.
- Every wait has a timeout: commands (``command_timeout``) and per-request progress (``stall_timeout``, not
  counted while generation is paused or asleep).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed (a step raised, or its thread died); the request cannot complete."""


class GenerationStalled(TimeoutError):
    """A request made no progress for `stall_timeout` seconds while generation was running."""


@dataclass(frozen=True)
class GenOutput:
    """Immutable snapshot of one request's progress (output lists are cumulative)."""

    request_id: str
    prompt_len: int
    output_ids: list[int]
    logprobs: list[float]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    matched_stop: int | str | None = None
    weight_version: Any = None
    cached_tokens: int = 0
    routed_experts: Any = None
    num_preemptions: int = 0
    abort_message: str | None = None
    error: str | None = None


@dataclass(eq=False)
class _Stream:
    loop: asyncio.AbstractEventLoop
    prompt_len: int
    progress: bool = True  # deliver every step's snapshot (streaming), else only the final one
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    last: Any = None  # the engine's latest RequestOutput (engine thread only)
    touched: float = field(default_factory=time.monotonic)  # last time the request progressed


@dataclass
class _Cmd:
    fn: Callable[[], Any]
    future: concurrent.futures.Future


class AsyncEngine:
    """Asyncio wrapper of an `LLMEngine` (see module docstring). Safe to call from any thread or event loop."""

    def __init__(self, engine: Any, *, stall_timeout: float = 600.0, command_timeout: float = 600.0):
        self.engine = engine
        self.stall_timeout = stall_timeout
        self.command_timeout = command_timeout
        self.paused = False
        self.asleep = False
        self.pause_mode: str | None = None
        self.error: BaseException | None = None
        self.num_steps = 0
        self.num_step_errors = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # requests progressed per step
        self.last_step_time = 0.0
        self.last_activity = time.monotonic()  # last step or command on the engine thread
        self._cmds: queue.SimpleQueue[_Cmd] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="miles-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API (any thread / loop)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.engine, "tokenizer", None)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def stalled(self) -> bool:
        """Requests are waiting, generation is not paused, yet the engine thread did nothing for `stall_timeout`."""
        idle = time.monotonic() - self.last_activity
        return self.num_inflight > 0 and not (self.paused or self.asleep) and idle > self.stall_timeout

    @property
    def num_inflight(self) -> int:
        with self._lock:
            return len(self._streams)

    def submit(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Schedule ``fn(engine)`` on the engine thread, between steps; returns a concurrent future."""
        if not self.alive:
            raise EngineError(f"engine thread is not running: {self.error!r}")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._cmds.put(_Cmd(lambda: fn(self.engine), fut))
        return fut

    def call_sync(self, fn: Callable[[Any], Any], timeout: float | None = None) -> Any:
        """Run ``fn(engine)`` on the engine thread and wait (blocking) for its result."""
        return self.submit(fn).result(timeout=timeout or self.command_timeout)

    async def call(self, fn: Callable[[Any], Any], timeout: float | None = None) -> Any:
        """Run ``fn(engine)`` on the engine thread and await its result."""
        fut = asyncio.wrap_future(self.submit(fn))
        return await asyncio.wait_for(fut, timeout or self.command_timeout)

    async def generate(self, prompt_ids: list[int], params: Any, request_id: str,
                       progress: bool = True) -> AsyncIterator[GenOutput]:
        """Yield a snapshot each time the request progresses (``progress=False``: only the final one, which
        saves a copy of the outputs per step); the last one has ``finished=True``.

        Closing the iterator early (client disconnect, cancellation, timeout) aborts the request in the engine.
        Raises `ValueError` for a duplicate id or parameters the engine rejects, `EngineError` if the engine fails.
        """
        stream = _Stream(asyncio.get_running_loop(), len(prompt_ids), progress)

        def _add(e: Any) -> None:  # registered on the engine thread, together with the engine request
            with self._lock:
                if request_id in self._streams:
                    raise ValueError(f"rid {request_id!r} is already in flight")
            e.add_request(list(prompt_ids), params, request_id=request_id)
            with self._lock:
                self._streams[request_id] = stream

        finished = False
        try:
            await self.call(_add)
            stream.touched = time.monotonic()
            while True:
                try:
                    out = await asyncio.wait_for(stream.queue.get(), timeout=min(self.stall_timeout, 5.0))
                except asyncio.TimeoutError:
                    if not self.alive:
                        raise EngineError(f"engine thread died: {self.error!r}") from None
                    now = time.monotonic()
                    if self.paused or self.asleep:
                        stream.touched = now
                    elif now - stream.touched > self.stall_timeout:
                        raise GenerationStalled(
                            f"request {request_id} made no progress for {self.stall_timeout:.0f}s"
                        ) from None
                    continue
                if out.error is not None:
                    finished = True
                    raise EngineError(out.error)
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:  # queued after `_add`, so it also covers a cancellation while adding
                with contextlib.suppress(EngineError):
                    self.submit(lambda e: self._abort(request_id, "aborted", only=stream))

    def abort(self, request_id: str) -> None:
        """Abort one request (no-op if unknown or finished); its stream ends with finish_reason ``abort``."""
        with contextlib.suppress(EngineError):
            self.submit(lambda e: self._abort(request_id, "aborted"))

    async def abort_request(self, request_id: str, message: str = "aborted") -> bool:
        """Abort one request and wait until it is aborted; False if it was not in flight."""
        return await self.call(lambda e: self._abort(request_id, message))

    async def abort_all(self, message: str = "aborted") -> int:
        """Abort every in-flight request; returns how many were aborted."""
        return await self.call(lambda e: self._abort_all(message))

    async def pause(self, mode: str = "abort") -> int:
        """Stop stepping. ``abort`` also aborts in-flight requests (returned with finish_reason abort);
        ``retract`` and ``in_place`` keep them (and their KV) until `resume`. Returns #requests aborted."""

        def _pause(e: Any) -> int:
            self.paused, self.pause_mode = True, mode
            return self._abort_all("generation paused") if mode == "abort" else 0

        return await self.call(_pause)

    async def resume(self) -> None:
        def _resume(e: Any) -> None:
            self.paused, self.pause_mode = False, None

        await self.call(_resume)

    async def sleep(self) -> None:
        """Free the KV cache and move weights off the accelerator (`engine.sleep()`); generation waits."""

        def _sleep(e: Any) -> None:
            if not self.asleep:
                self.asleep = True
                e.sleep()

        await self.call(_sleep)

    async def wake_up(self) -> None:
        def _wake(e: Any) -> None:
            if self.asleep:
                e.wake_up()
                self.asleep = False

        await self.call(_wake)

    async def update_weights_from_disk(self, path: str, version: int | None = None, abort_all: bool = False) -> Any:
        """Load an HF checkpoint directory between steps; returns the new weight version (None: bumped)."""

        def _update(e: Any) -> Any:
            if abort_all:
                self._abort_all("aborted for weight update")
            if version is None:
                return e.update_weights_from_disk(path)
            return e.update_weights_from_disk(path, version)

        return await self.call(_update)

    def update_weights(self, items: Any, version: int | None = None, timeout: float | None = None) -> Any:
        """Blocking: copy a bucket of HF-named tensors into the engine between steps (in-process weight sync)."""
        return self.call_sync(lambda e: e.update_weights(items, version), timeout)

    @staticmethod
    def _engine_stats(e: Any) -> Any:
        st = getattr(e, "stats", None)
        return jsonable(st.as_dict(e) if hasattr(st, "as_dict") else st)

    def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        """Blocking (any thread): step statistics plus the engine's own `stats`, read on the engine thread."""
        return {**self.local_stats(), "engine": self.call_sync(self._engine_stats, timeout)}

    async def stats_async(self, timeout: float = 30.0) -> dict[str, Any]:
        """`stats()` for coroutines."""
        return {**self.local_stats(), "engine": await self.call(self._engine_stats, timeout)}

    def local_stats(self) -> dict[str, Any]:
        """Requests progressed per `step()` as seen by this wrapper (no engine access)."""
        sizes = self.batch_sizes
        steps = sum(sizes.values())
        out: dict[str, Any] = {
            "num_steps": self.num_steps,
            "num_step_errors": self.num_step_errors,
            "num_inflight": self.num_inflight,
            "paused": self.paused,
            "asleep": self.asleep,
            "max_batch_size": max(sizes) if sizes else 0,
            "mean_batch_size": (sum(k * v for k, v in sizes.items()) / steps) if steps else 0.0,
            "batch_size_histogram": {str(k): v for k, v in sorted(sizes.items())},
        }
        return out

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread (in-flight requests end with an error)."""
        self._stop.set()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = not self.paused and not self.asleep and self.engine.has_unfinished()
                try:
                    cmd = self._cmds.get_nowait() if busy else self._cmds.get(timeout=0.05)
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    self._exec(cmd)
                    try:
                        cmd = self._cmds.get_nowait()
                    except queue.Empty:
                        cmd = None
                if not self.paused and not self.asleep and self.engine.has_unfinished():
                    self._step()
        except BaseException as e:  # the loop itself broke: fail everything loudly
            logger.exception("engine thread crashed")
            self.error = e
        finally:
            self._fail_all(f"engine stopped: {self.error!r}" if self.error else "engine shut down")
            while True:
                try:
                    self._cmds.get_nowait().future.set_exception(EngineError("engine stopped"))
                except queue.Empty:
                    break

    def _exec(self, cmd: _Cmd) -> None:
        self.last_activity = time.monotonic()
        if not cmd.future.set_running_or_notify_cancel():
            return
        try:
            cmd.future.set_result(cmd.fn())
        except BaseException as e:
            cmd.future.set_exception(e)

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception as e:
            logger.exception("engine.step() failed; failing in-flight requests")
            self.num_step_errors += 1
            self._stop.wait(0.05)  # a persistently broken engine must not spin
            with self._lock:
                rids = list(self._streams)
            for rid in rids:
                with contextlib.suppress(Exception):
                    self.engine.abort(rid)
            self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
            return
        self.num_steps += 1
        self.last_step_time = self.last_activity = time.monotonic()
        if outs:
            self.batch_sizes[len(outs)] += 1
        for o in outs:
            self._deliver(o)

    def _deliver(self, o: Any) -> None:
        rid = o.request_id
        with self._lock:
            stream = self._streams.get(rid)
            if stream is not None and o.finished:
                del self._streams[rid]
        if stream is None:
            return
        stream.last, stream.touched = o, time.monotonic()
        if o.finished or stream.progress:
            self._put(stream, self._snapshot(o, stream.prompt_len))

    @staticmethod
    def _snapshot(o: Any, prompt_len: int, **override: Any) -> GenOutput:
        kw = dict(
            request_id=o.request_id,
            prompt_len=prompt_len,
            output_ids=list(o.output_ids),
            logprobs=[float(x) for x in (o.logprobs or [])],
            finished=bool(o.finished),
            finish_reason=o.finish_reason,
            matched_stop=getattr(o, "matched_stop", None),
            weight_version=o.weight_version,
            cached_tokens=int(getattr(o, "cached_tokens", 0) or 0),
            routed_experts=getattr(o, "routed_experts", None) if o.finished else None,
            num_preemptions=int(getattr(o, "num_preemptions", 0) or 0),
        )
        kw.update(override)
        return GenOutput(**kw)

    def _put(self, stream: _Stream, item: GenOutput) -> None:
        with contextlib.suppress(RuntimeError):  # the request's loop is closed: nobody is listening
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _abort(self, rid: str, message: str, only: _Stream | None = None) -> bool:
        with self._lock:
            if only is not None and self._streams.get(rid) is not only:
                return False  # not ours (e.g. a duplicate rid that was rejected): leave it alone
            stream = self._streams.pop(rid, None)
        with contextlib.suppress(KeyError, ValueError):
            self.engine.abort(rid)
        if stream is None:
            return False
        msg = {"finished": True, "finish_reason": "abort", "matched_stop": None, "abort_message": message}
        if stream.last is not None:
            snap = self._snapshot(stream.last, stream.prompt_len, routed_experts=None, **msg)
        else:
            snap = GenOutput(rid, stream.prompt_len, [], [], weight_version=self.engine.weight_version, **msg)
        self._put(stream, snap)
        return True

    def _abort_all(self, message: str) -> int:
        with self._lock:
            rids = list(self._streams)
        return sum(self._abort(rid, message) for rid in rids)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            streams = list(self._streams.items())
            self._streams.clear()
        for rid, stream in streams:
            self._put(stream, GenOutput(rid, stream.prompt_len, [], [], True, error=message))


def jsonable(x: Any) -> Any:
    """Best-effort conversion of engine stats (dataclasses, counters, tensors) to JSON-compatible values."""
    import dataclasses

    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, collections.deque)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "__dict__"):
        return {k: jsonable(v) for k, v in vars(x).items() if not k.startswith("_")}
    return repr(x)
