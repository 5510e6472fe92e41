"""Weight sync trainer → engines: ONE loop over `Trainer.iter_weight_buckets`, pluggable transports.

`push_weights` runs on every trainer rank (the iterator all-gathers FSDP shards, a collective); rank 0
hands each bucket of full HF-named tensors to its transport:

* `ObjectStoreTransport` ("ipc", colocated / same node): the bucket goes through Ray's shared-memory
  object store to each `EngineActor.load_weights`.
* `CollectiveTransport` ("collective", disaggregated): a torch.distributed group of trainer rank 0
  (rank 0) and the engine actors (ranks 1..E), gloo on CPU, NCCL on GPU. Per bucket, the engines are
  told the tensor names/shapes/dtypes through a Ray actor call, then one broadcast per dtype carries
  the flattened bucket.
* `DiskTransport` ("disk", fallback, external engines): buckets become safetensors shards of an HF
  directory, then every engine gets `POST /update_weights_from_disk`.

Every transport ends with the engines at `weight_version == version`. `sync_weights` (driver side)
pauses generation, runs the loop on all ranks with a timeout, resumes, and returns timing metrics.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

Bucket = list[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # e.g. "float32"
    shape: tuple[int, ...]


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def flatten_bucket(bucket: Bucket) -> tuple[list[TensorMeta], dict[str, torch.Tensor]]:
    """Metas in bucket order, and one contiguous 1-D buffer per dtype (tensors concatenated in order)."""
    metas, parts = [], {}
    for name, t in bucket:
        dtype = str(t.dtype).removeprefix("torch.")
        metas.append(TensorMeta(name, dtype, tuple(t.shape)))
        parts.setdefault(dtype, []).append(t.detach().reshape(-1))
    return metas, {k: torch.cat(v) if len(v) > 1 else v[0].contiguous() for k, v in parts.items()}


def unflatten_bucket(metas: list[TensorMeta], flats: dict[str, torch.Tensor]) -> Bucket:
    """Inverse of `flatten_bucket` (views into the flat buffers)."""
    offsets = dict.fromkeys(flats, 0)
    out = []
    for m in metas:
        n = 1
        for s in m.shape:
            n *= s
        o = offsets[m.dtype]
        out.append((m.name, flats[m.dtype][o : o + n].view(m.shape)))
        offsets[m.dtype] = o + n
    return out


def dtype_sizes(metas: list[TensorMeta]) -> dict[str, int]:
    """Elements per dtype, in first-seen order (both sides of a broadcast derive the same order)."""
    sizes: dict[str, int] = {}
    for m in metas:
        n = 1
        for s in m.shape:
            n *= s
        sizes[m.dtype] = sizes.get(m.dtype, 0) + n
    return sizes


def bucket_bytes(bucket: Bucket) -> int:
    return sum(t.numel() * t.element_size() for _, t in bucket)


# ---- the process group between trainer rank 0 and the engines ---------------------------------


def create_weight_group(
    master_addr: str, master_port: int, rank: int, world_size: int, backend: str, timeout_s: float = 600.0
) -> dist.ProcessGroup:
    """A standalone process group (independent of the trainer's default FSDP group). Rank 0 hosts the store."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_addr, master_port, world_size, rank == 0, timeout=timeout)
    store = dist.PrefixStore("miles_weight_sync", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"weight group backend must be gloo or nccl, got {backend!r}")


def broadcast(group: dist.ProcessGroup, tensor: torch.Tensor, root: int = 0) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    group.broadcast([tensor], opts).wait()


def receive_bucket(group: dist.ProcessGroup, metas: list[TensorMeta], device: str) -> Bucket:
    """Engine side of `CollectiveTransport.send`: receive the per-dtype broadcasts, unflatten."""
    flats = {}
    for dtype, n in dtype_sizes(metas).items():
        buf = torch.empty(n, dtype=_dtype(dtype), device=device)
        broadcast(group, buf)
        flats[dtype] = buf
    return unflatten_bucket(metas, flats)


# ---- transports (trainer rank 0 side) ----------------------------------------------------------


class Transport:
    """Carries buckets of full HF-named tensors to the engines; `finish` completes one sync."""

    name = "base"

    def send(self, bucket: Bucket, version: int) -> None:
        raise NotImplementedError

    def finish(self, version: int) -> None:
        pass

    def close(self) -> None:
        pass


def _wait(refs: list, timeout: float, what: str) -> list:
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if pending:
        raise TimeoutError(f"weight sync: {len(pending)} engine(s) did not finish {what} within {timeout:.0f}s")
    return ray.get(ready)


class ObjectStoreTransport(Transport):
    """Buckets through Ray's object store (shared memory on one node) into `EngineActor.load_weights`."""

    name = "ipc"

    def __init__(self, engines: list, timeout: float = 600.0):
        self.engines, self.timeout = engines, timeout

    def send(self, bucket: Bucket, version: int) -> None:
        ref = ray.put([(n, t.detach().cpu()) for n, t in bucket])
        _wait([e.load_weights.remote(ref, version) for e in self.engines], self.timeout, "loading a bucket")


class CollectiveTransport(Transport):
    """Broadcast in a torch.distributed group whose rank 0 is trainer rank 0 and ranks 1..E the engines."""

    name = "collective"

    def __init__(self, engines: list, group: dist.ProcessGroup, device: str, timeout: float = 600.0):
        self.engines, self.group, self.device, self.timeout = engines, group, device, timeout

    def send(self, bucket: Bucket, version: int) -> None:
        metas, flats = flatten_bucket(bucket)
        refs = [e.recv_weights.remote(metas, version) for e in self.engines]
        for dtype in dtype_sizes(metas):
            broadcast(self.group, flats[dtype].to(self.device))
        _wait(refs, self.timeout, "receiving a bucket")


class DiskTransport(Transport):
    """Buckets → safetensors shards of an HF directory; then `POST /update_weights_from_disk` on each engine."""

    name = "disk"

    def __init__(self, directory: str, engine_urls: list[str], hf_checkpoint: str, timeout: float = 600.0):
        self.directory, self.urls, self.timeout = Path(directory), engine_urls, timeout
        self.hf_checkpoint = hf_checkpoint
        self._shard = 0
        self._weight_map: dict[str, str] = {}

    def send(self, bucket: Bucket, version: int) -> None:
        from safetensors.torch import save_file

        if self._shard == 0:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True)
        name = f"model-{self._shard:05d}.safetensors"
        save_file({n: t.detach().cpu().contiguous() for n, t in bucket}, str(self.directory / name))
        self._weight_map.update({n: name for n, _ in bucket})
        self._shard += 1

    def finish(self, version: int) -> None:
        import httpx

        index = {"metadata": {"weight_version": version}, "weight_map": self._weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        for f in Path(self.hf_checkpoint).iterdir():  # config, tokenizer, generation config
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                shutil.copy(f, self.directory / f.name)
        self._shard, self._weight_map = 0, {}
        for url in self.urls:
            r = httpx.post(
                url.rstrip("/") + "/update_weights_from_disk",
                json={"model_path": str(self.directory), "weight_version": str(version)},
                timeout=self.timeout,
            )
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code != 200 or body.get("success") is False:
                raise RuntimeError(f"weight sync (disk): {url} /update_weights_from_disk failed: {r.status_code} "
                                   f"{r.text[:500]}")


def push_weights(buckets: Iterable[Bucket], transport: Transport | None, version: int) -> dict[str, float]:
    """THE weight-sync loop (every trainer rank runs it; `transport` is None except on rank 0)."""
    t0 = time.perf_counter()
    n_buckets = n_bytes = n_tensors = 0
    for bucket in buckets:
        if transport is not None:
            transport.send(bucket, version)
        n_buckets += 1
        n_tensors += len(bucket)
        n_bytes += bucket_bytes(bucket)
    if transport is not None:
        transport.finish(version)
    return {
        "weight_sync/buckets": n_buckets,
        "weight_sync/tensors": n_tensors,
        "weight_sync/bytes": n_bytes,
        "weight_sync/push_seconds": time.perf_counter() - t0,
    }


def sync_weights(trainers: list, engines: list, version: int, timeout: float) -> dict[str, Any]:
    """Driver side of one sync: pause generation, run `push_weights` on every trainer rank (rank 0 owns the
    transport set up by `TrainActor.setup_weight_sync`), resume, and check every engine reports `version`."""
    t0 = time.perf_counter()
    if engines:
        _wait([e.pause.remote() for e in engines], timeout, "pausing generation")
    try:
        stats = _wait([t.push_weights.remote(version) for t in trainers], timeout, "the weight push")[0]
    finally:
        if engines:
            _wait([e.resume.remote() for e in engines], timeout, "resuming generation")
    versions = _wait([e.weight_version.remote() for e in engines], timeout, "reporting weight versions")
    if any(str(v) != str(version) for v in versions):
        raise RuntimeError(f"weight sync: engines report weight versions {versions}, expected {version}")
    stats = dict(stats)
    stats["perf/weight_sync_seconds"] = time.perf_counter() - t0
    stats["weight_sync/version"] = version
    return stats


def default_disk_dir(args: Any) -> str:
    base = getattr(args, "update_weight_disk_dir", None) or os.path.join(args.run_dir, "weight_sync")
    return str(base)
