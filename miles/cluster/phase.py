"""Every wait on remote work is bounded and named: `wait_refs` (Ray calls) and `run_local` (driver work).

On timeout, the Python stacks of the driver and of the given actors are dumped (faulthandler) to stderr
and to `<run dir>/stacks-<phase>-<time>.txt`, and `PhaseTimeout` names the phase; an actor failure is
re-raised as `PhaseError` naming the phase.
"""

from __future__ import annotations

import faulthandler
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray

logger = logging.getLogger(__name__)


class PhaseTimeout(TimeoutError):
    """A phase (rollout, train, weight sync, ...) did not finish within its timeout."""


class PhaseError(RuntimeError):
    """A phase failed; the message names it and carries the remote error."""


def enable_stack_dump_signal() -> None:
    """`kill -USR1 <pid>` prints every thread's Python stack to stderr (driver and actors)."""
    import signal

    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def dump_all_stacks() -> str:
    """Python stacks of every thread of this process (faulthandler's format)."""
    with tempfile.TemporaryFile("w+") as fh:
        faulthandler.dump_traceback(fh, all_threads=True)
        fh.seek(0)
        return fh.read()


def dump_stacks(phase: str, actors: Sequence[Any] = (), run_dir: str | None = None, timeout: float = 15.0) -> str:
    """Dump the driver's and the actors' Python stacks; returns the report (also written under run_dir)."""
    parts = [f"==== stacks dumped for stuck phase {phase!r} at {time.strftime('%H:%M:%S')} ===="]
    parts.append("---- driver ----")
    parts.append(dump_all_stacks())
    refs = []
    for i, actor in enumerate(actors):
        try:
            refs.append((i, actor.dump_stacks.remote()))
        except Exception as e:  # noqa: BLE001 - best effort diagnostics
            parts.append(f"---- actor {i}: cannot ask for stacks: {e!r}")
    for i, ref in refs:
        try:
            parts.append(f"---- actor {i} ----\n" + ray.get(ref, timeout=timeout))
        except Exception as e:  # noqa: BLE001
            parts.append(f"---- actor {i}: no stacks within {timeout:.0f}s: {e!r}")
    report = "\n".join(parts)
    print(report, file=sys.stderr, flush=True)
    if run_dir:
        path = Path(run_dir) / f"stacks-{phase.replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)
    return report


def wait_refs(
    refs: list,
    phase: str,
    timeout: float,
    actors: Sequence[Any] = (),
    run_dir: str | None = None,
) -> list:
    """`ray.get(refs)` bounded by `timeout` seconds; names `phase` in every error."""
    if not refs:
        return []
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if pending:
        dump_stacks(phase, actors, run_dir)
        raise PhaseTimeout(
            f"phase {phase!r}: {len(pending)} of {len(refs)} remote calls did not finish within {timeout:.0f}s "
            f"(stacks dumped above{' and under ' + run_dir if run_dir else ''})"
        )
    try:
        return ray.get(refs)
    except ray.exceptions.RayError as e:
        raise PhaseError(f"phase {phase!r} failed: {e}") from e


def run_local(
    fn: Callable[[], Any],
    phase: str,
    timeout: float,
    actors: Sequence[Any] = (),
    run_dir: str | None = None,
) -> Any:
    """Run `fn()` in a daemon thread of the driver, bounded by `timeout` seconds."""
    return LocalTask(fn, phase).result(timeout, actors, run_dir)


class LocalTask:
    """A driver-side background task (the one-step-off rollout) awaited later with a timeout."""

    def __init__(self, fn: Callable[[], Any], phase: str):
        self.phase = phase
        self.box: dict[str, Any] = {}
        self.done = threading.Event()

        def target() -> None:
            try:
                self.box["value"] = fn()
            except BaseException as e:  # noqa: BLE001
                self.box["error"] = e
            finally:
                self.done.set()

        self.thread = threading.Thread(target=target, name=f"miles-{phase}", daemon=True)
        self.thread.start()

    def result(self, timeout: float, actors: Sequence[Any] = (), run_dir: str | None = None) -> Any:
        return wait_local(self.thread, self.done, self.box, self.phase, timeout, actors, run_dir)


def wait_local(thread, done, box, phase, timeout, actors, run_dir) -> Any:
    if not done.wait(timeout):
        dump_stacks(phase, actors, run_dir)
        raise PhaseTimeout(f"phase {phase!r} did not finish within {timeout:.0f}s (stacks dumped above)")
    if "error" in box:
        err = box["error"]
        raise PhaseError(f"phase {phase!r} failed: {type(err).__name__}: {err}") from err
    return box["value"]
