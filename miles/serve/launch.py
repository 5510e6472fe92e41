"""Start `miles serve` / `miles router` as subprocesses (or an app in a thread) on a free port and wait for /health.

    with launch_server(ckpt_dir, args=["--max-num-seqs", "64"]) as srv:
        requests.post(srv.url + "/generate", json={...})

Used by tests, the RL loop and scripts. Every wait has a timeout; on failure the error carries the log's tail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None,
                 path: str = "/health", api_key: str | None = None, log_path: Path | None = None) -> None:
    """Poll `url + path` until it answers 200; raise `TimeoutError` / `RuntimeError` (process exited)."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with code {proc.returncode} before becoming healthy"
                               + _tail(log_path))
        try:
            r = httpx.get(url + path, timeout=2.0, headers=headers, trust_env=False)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}"
        time.sleep(0.2)
    raise TimeoutError(f"{url}{path} not healthy after {timeout:.0f}s (last: {last})" + _tail(log_path))


def _tail(log_path: Path | None, n: int = 4000) -> str:
    if log_path is None or not Path(log_path).exists():
        return ""
    text = Path(log_path).read_text(errors="replace")
    return "\n--- log tail ---\n" + text[-n:]


@dataclass
class ServerProcess:
    """A running `miles serve` / `miles router` subprocess."""

    proc: subprocess.Popen
    url: str
    port: int
    log_path: Path
    argv: list[str] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        return _tail(self.log_path, n)

    def kill(self) -> None:
        """SIGKILL (simulates a crash)."""
        if self.alive:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _launch(command: str, args: Sequence[str], *, host: str, port: int | None, timeout: float,
            api_key: str | None, env: dict | None, log_path: str | Path | None, retries: int = 3) -> ServerProcess:
    last_err: Exception | None = None
    for _ in range(retries):
        p = port or free_port(host)
        argv = [sys.executable, "-m", "miles.cli", command, "--host", host, "--port", str(p), *args]
        if api_key:
            argv += ["--api-key", api_key]
        log = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix=f"miles-{command}-", suffix=".log")[1])
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log, "ab") as fh:
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=full_env,
                                    stdin=subprocess.DEVNULL)
        srv = ServerProcess(proc, f"http://{host}:{p}", p, log, argv)
        try:
            wait_healthy(srv.url, timeout, proc=proc, log_path=log)
            return srv
        except RuntimeError as e:  # exited early: maybe the port was taken in between; try another
            last_err = e
            if port is not None or "address already in use" not in srv.log_tail().lower():
                raise
        except BaseException:
            srv.stop()
            raise
    raise RuntimeError(f"could not start miles {command}") from last_err


def launch_server(model: str | Path, *, args: Sequence[str] = (), host: str = "127.0.0.1", port: int | None = None,
                  api_key: str | None = None, timeout: float = 180.0, env: dict | None = None,
                  log_path: str | Path | None = None) -> ServerProcess:
    """Start `miles serve --model MODEL [args]` and wait until /health answers."""
    return _launch("serve", ["--model", str(model), *args], host=host, port=port, timeout=timeout,
                   api_key=api_key, env=env, log_path=log_path)


def launch_router(worker_urls: Sequence[str], *, args: Sequence[str] = (), host: str = "127.0.0.1",
                  port: int | None = None, api_key: str | None = None, timeout: float = 60.0,
                  env: dict | None = None, log_path: str | Path | None = None) -> ServerProcess:
    """Start `miles router --worker-urls ...` and wait until /health answers."""
    wargs = ["--worker-urls", *worker_urls] if worker_urls else []
    return _launch("router", [*wargs, *args], host=host, port=port, timeout=timeout, api_key=api_key, env=env,
                   log_path=log_path)


class ServerThread:
    """Serve an ASGI app with uvicorn in a background thread of this process (socket bound before start)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"uvicorn-{self.port}")

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"in-process server on {self.url} did not start within {timeout:.0f}s")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve_engine(engine: Any, *, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 model_path: str | None = None, served_model_name: str | None = None,
                 stall_timeout: float = 600.0, log_level: str = "warning") -> ServerThread:
    """Serve an in-process `LLMEngine` over HTTP from a background thread (started; `.stop()` when done).

    The returned `ServerThread` has `.async_engine` (the `AsyncEngine` that now owns the engine: call engine
    methods through `async_engine.call_sync(fn)` only) and `.url`.
    """
    from miles.serve.async_engine import AsyncEngine
    from miles.serve.server import build_app
    from miles.serve.state import ServerConfig, engine_context_len, engine_vocab_size

    aengine = AsyncEngine(engine, stall_timeout=stall_timeout)
    path = model_path or str(getattr(getattr(engine, "config", None), "model", "") or "model")
    cfg = ServerConfig(model_path=path, served_model_name=served_model_name or Path(path).name or "model",
                       context_len=engine_context_len(engine), vocab_size=engine_vocab_size(engine), api_key=api_key)
    st = ServerThread(build_app(aengine, cfg), host=host, port=port, log_level=log_level)
    st.async_engine = aengine
    _stop = st.stop

    def stop(timeout: float = 10.0) -> None:
        _stop(timeout)
        aengine.shutdown()

    st.stop = stop
    return st.start()
