"""Ray actors: one `TrainActor` per trainer rank, one `EngineActor` per rollout engine.

`TrainActor` joins the trainer's torch.distributed group (gloo on CPU, NCCL on GPU; rank 0 publishes
MASTER_ADDR/PORT) and owns a `miles.trainer.Trainer`. `EngineActor` runs `miles serve` in-process (the
FastAPI app under uvicorn in a thread, over an `AsyncEngine`) so that weight updates reach the engine
directly (object store or a torch.distributed group) while clients use HTTP. Both are threaded actors
(`max_concurrency`) so `dump_stacks` answers while a long call runs.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

import ray
import torch

from miles.cluster import weight_sync as ws
from miles.cluster.phase import dump_all_stacks, enable_stack_dump_signal

logger = logging.getLogger(__name__)


def free_port(host: str = "") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    enable_stack_dump_signal()


# =============================================================================================
# trainer rank
# =============================================================================================
class TrainActor:
    """One trainer rank: process group, `Trainer`, checkpoints, and its side of weight sync."""

    def __init__(self, args: Any, rank: int, world_size: int, device: str):
        _setup_logging()
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.args, self.rank, self.world_size, self.device = args, rank, world_size, device
        self.trainer: Any = None
        self.transport: ws.Transport | None = None

    def master_address(self) -> tuple[str, int]:
        """Rank 0: the address/port the other ranks rendezvous at."""
        ip = ray.util.get_node_ip_address()
        return ip, free_port()

    def init(self, master_addr: str, master_port: int) -> dict:
        """Join the process group and build the trainer from --hf-checkpoint."""
        import torch.distributed as dist

        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
        )
        backend = "nccl" if self.device == "cuda" else "gloo"
        if self.device == "cuda":
            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        dist.init_process_group(backend, rank=self.rank, world_size=self.world_size)
        self.trainer = build_trainer(self.args, self.device)
        return {"rank": self.rank, "backend": backend}

    def train(self, rollout_id: int, batch: list) -> dict:
        metrics = self.trainer.train(batch)
        return {k: _scalar(v) for k, v in (metrics or {}).items()}

    def save(self, path: str) -> None:
        self.trainer.save(path)

    def load(self, path: str) -> None:
        self.trainer.load(path)

    def export_hf(self, path: str) -> None:
        self.trainer.export_hf(path)

    def offload(self) -> None:
        self.trainer.offload()

    def onload(self) -> None:
        self.trainer.onload()

    # ---- weight sync --------------------------------------------------------------------
    def setup_weight_sync(self, transport: str, engines: list, group_addr: tuple[str, int] | None = None,
                          engine_urls: list[str] | None = None, disk_dir: str | None = None,
                          timeout: float = 600.0) -> None:
        """Create rank 0's transport (other ranks only take part in the bucket gathers)."""
        if self.rank != 0:
            return
        if transport == "ipc":
            self.transport = ws.ObjectStoreTransport(engines, timeout)
        elif transport == "collective":
            addr, port = group_addr
            backend = "nccl" if self.device == "cuda" else "gloo"
            group = ws.create_weight_group(addr, port, 0, 1 + len(engines), backend, timeout)
            self.transport = ws.CollectiveTransport(engines, group, "cuda" if self.device == "cuda" else "cpu", timeout)
        elif transport == "disk":
            self.transport = ws.DiskTransport(disk_dir, engine_urls or [], self.args.hf_checkpoint, timeout)
        else:
            raise ValueError(f"unknown weight-sync transport {transport!r}")

    def push_weights(self, version: int) -> dict:
        dtype = torch.bfloat16 if self.device == "cuda" else None  # what the engine serves in
        buckets = self.trainer.iter_weight_buckets(self.args.update_weight_buffer_size, dtype)
        return ws.push_weights(buckets, self.transport if self.rank == 0 else None, version)

    def get_weights(self) -> dict[str, torch.Tensor] | None:
        """Full HF-named tensors (rank 0; None elsewhere) — for tests and --check-weight-update-equal."""
        out = {}
        for bucket in self.trainer.iter_weight_buckets(self.args.update_weight_buffer_size):
            if self.rank == 0:
                out.update({n: t.detach().cpu().clone() for n, t in bucket})
        return out if self.rank == 0 else None

    def dump_stacks(self) -> str:
        return dump_all_stacks()


def build_trainer(args: Any, device: str) -> Any:
    """The per-rank `Trainer` for `args` (inside an initialised process group)."""
    import dataclasses

    from miles.trainer.config import AlgoConfig, TrainerConfig
    from miles.trainer.trainer import Trainer

    def make(cls: type) -> Any:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})

    cfg = make(TrainerConfig)
    cfg.device = device
    return Trainer(args.hf_checkpoint, make(AlgoConfig), cfg)


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


# =============================================================================================
# rollout engine
# =============================================================================================
class EngineActor:
    """One rollout engine: `LLMEngine` + `AsyncEngine` + the `miles serve` app on a uvicorn thread."""

    def __init__(self, args: Any, index: int, device: str, host: str = "127.0.0.1"):
        _setup_logging()
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.args, self.index, self.device, self.host = args, index, device, host
        self.aengine: Any = None
        self.server: Any = None
        self.state: Any = None
        self.weight_group: Any = None

    def start(self, timeout: float = 600.0) -> str:
        """Load the model and serve it (`miles serve` app on a uvicorn thread); returns the base URL."""
        from miles.engine import EngineConfig, LLMEngine
        from miles.serve.launch import serve_engine

        a = self.args
        kw: dict[str, Any] = {"device": "cuda" if self.device == "cuda" else "cpu", "seed": a.seed + self.index}
        kw["max_num_seqs"] = a.engine_max_num_seqs
        if a.engine_max_model_len:
            kw["max_model_len"] = a.engine_max_model_len
        if a.engine_kv_cache_tokens:
            kw["kv_cache_tokens"] = a.engine_kv_cache_tokens
        if a.engine_kv_memory_fraction:
            kw["kv_memory_fraction"] = a.engine_kv_memory_fraction
        engine = LLMEngine(EngineConfig(model=a.hf_checkpoint, **kw))
        self.server = serve_engine(engine, host=self.host, model_path=os.path.abspath(a.hf_checkpoint),
                                   stall_timeout=a.phase_timeout)
        self.aengine = self.server.async_engine
        self.state = self.server.server.config.app.state.serve
        return self.server.url

    def url(self) -> str:
        return self.server.url

    # ---- control ------------------------------------------------------------------------
    def _run(self, coro_fn) -> Any:
        import asyncio

        return asyncio.run(coro_fn())

    def pause(self, mode: str = "in_place") -> None:
        """Stop stepping between two engine steps (in-flight requests keep their KV and continue on resume)."""
        self._run(lambda: self.aengine.pause(mode))

    def resume(self) -> None:
        self._run(self.aengine.resume)

    def sleep(self) -> None:
        self._run(self.aengine.sleep)

    def wake_up(self) -> None:
        self._run(self.aengine.wake_up)

    def weight_version(self) -> str:
        return self.state.version_label()

    def stats(self) -> dict:
        return self.aengine.stats()

    # ---- weight sync receivers ------------------------------------------------------------
    def load_weights(self, items: list, version: int) -> None:
        """In-process update with (hf_name, tensor) pairs (from the object store); sets the weight version."""
        self.aengine.call_sync(lambda e: e.update_weights(items, version))

    def join_weight_group(self, master_addr: str, master_port: int, rank: int, world_size: int,
                          timeout: float = 600.0) -> None:
        backend = "nccl" if self.device == "cuda" else "gloo"
        self.weight_group = ws.create_weight_group(master_addr, master_port, rank, world_size, backend, timeout)

    def recv_weights(self, metas: list, version: int) -> None:
        """Receive one broadcast bucket from trainer rank 0 and load it."""
        items = ws.receive_bucket(self.weight_group, metas, "cuda" if self.device == "cuda" else "cpu")
        self.load_weights(items, version)

    def get_weights(self) -> dict[str, torch.Tensor]:
        """The engine model's HF-named tensors (CPU copies), for equality checks."""
        from miles.models import hf_items

        def read(e: Any) -> dict:
            return {n: t.detach().cpu().clone() for n, t in hf_items(e.model)}

        return self.aengine.call_sync(read)

    def dump_stacks(self) -> str:
        return dump_all_stacks()

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
