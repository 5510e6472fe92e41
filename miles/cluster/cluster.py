"""`Cluster`: the driver's handle on the trainer ranks, the engines and the router.

`Cluster.start(args)` reserves the placement group, starts `TrainActor`s (one FSDP2 process group) and
`EngineActor`s (each serving `miles serve` in-process), the router in front of them, and prepares the
weight-sync transport. Every method waits with `args.phase_timeout` and names its phase on failure.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import ray

from miles.cluster import weight_sync as ws
from miles.cluster.actors import EngineActor, TrainActor
from miles.cluster.phase import wait_refs
from miles.cluster.placement import Placement, create_placement, resolve_device

logger = logging.getLogger(__name__)


@dataclass
class Cluster:
    args: Any
    placement: Placement
    trainers: list = field(default_factory=list)
    engines: list = field(default_factory=list)
    engine_urls: list[str] = field(default_factory=list)
    router: Any = None  # miles.serve.launch.ServerProcess
    weight_version: int = 0

    # ---- start-up -----------------------------------------------------------------------------
    @classmethod
    def start(cls, args: Any) -> Cluster:
        if args.colocate and args.update_weight_transport == "collective" and resolve_device(args.device) == "cuda":
            raise ValueError("--colocate with --update-weight-transport collective would put two NCCL ranks on one "
                             "GPU; use ipc (the default with --colocate) or disk")
        placement = create_placement(args, timeout=args.engine_startup_timeout)
        self = cls(args, placement)
        try:
            # trainers first: colocated engines size their KV cache from the memory the offloaded trainer leaves
            self._start_trainers()
            if args.colocate and args.offload_train and self.trainers:
                self.offload_trainers()
            self._start_engines()
            self._setup_weight_sync()
        except BaseException:
            self.shutdown()
            raise
        return self

    def _wait(self, refs: list, phase: str, actors: list | None = None, timeout: float | None = None) -> list:
        actors = self.trainers + self.engines if actors is None else actors
        return wait_refs(refs, phase, timeout or self.args.phase_timeout, actors, self.args.run_dir)

    def _start_trainers(self) -> None:
        slots = self.placement.trainer_slots
        if not slots:
            return
        env = {"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}}
        actor_cls = ray.remote(TrainActor)
        self.trainers = [
            actor_cls.options(max_concurrency=4, runtime_env=env, **slot.options(self.placement.pg)).remote(
                self.args, rank, len(slots), self.placement.device
            )
            for rank, slot in enumerate(slots)
        ]
        addr, port = self._wait([self.trainers[0].master_address.remote()], "trainer rendezvous")[0]
        self._wait([t.init.remote(addr, port) for t in self.trainers], "trainer start-up",
                   timeout=self.args.engine_startup_timeout)
        logger.info("trainer: %d ranks ready (%s)", len(self.trainers), self.placement.device)

    def _start_engines(self) -> None:
        external = getattr(self.args, "rollout_external_engine_addrs", None)
        if external:
            self.engine_urls = [u if u.startswith("http") else f"http://{u}" for u in external]
        slots = self.placement.engine_slots
        if slots:
            host = ray.util.get_node_ip_address() if os.environ.get("RAY_ADDRESS") else "127.0.0.1"
            env = {"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}}
            actor_cls = ray.remote(EngineActor)
            self.engines = [
                actor_cls.options(max_concurrency=4, runtime_env=env, **slot.options(self.placement.pg)).remote(
                    self.args, i, self.placement.device, host
                )
                for i, slot in enumerate(slots)
            ]
            t = self.args.engine_startup_timeout
            self.engine_urls += self._wait([e.start.remote(t) for e in self.engines], "engine start-up", timeout=t)
        if not self.engine_urls:
            return
        if len(self.engine_urls) == 1:
            url = self.engine_urls[0]  # one engine: no router needed, the engine speaks the same API
        else:
            from miles.serve.launch import launch_router

            self.router = launch_router(self.engine_urls, timeout=self.args.engine_startup_timeout,
                                        log_path=os.path.join(self.args.run_dir, "router.log"))
            url = self.router.url
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.args.sglang_router_ip, self.args.sglang_router_port = host, int(port)
        logger.info("rollout: %d engine(s) behind %s", len(self.engine_urls), url)

    def _setup_weight_sync(self) -> None:
        if not self.trainers or not self.engine_urls:
            return
        transport = self.args.update_weight_transport
        timeout = self.args.phase_timeout
        group_addr = None
        refs = []
        if transport == "collective":
            addr, port = self._wait([self.trainers[0].master_address.remote()], "weight group rendezvous")[0]
            group_addr = (addr, port)
            world = 1 + len(self.engines)
            refs = [e.join_weight_group.remote(addr, port, 1 + i, world, timeout) for i, e in enumerate(self.engines)]
        disk_dir = ws.default_disk_dir(self.args)
        refs += [
            t.setup_weight_sync.remote(transport, self.engines, group_addr, self.engine_urls, disk_dir, timeout)
            for t in self.trainers
        ]
        self._wait(refs, "weight-sync set-up")

    # ---- phases ---------------------------------------------------------------------------------
    def train(self, rollout_id: int, batch: list) -> dict:
        ref = ray.put(batch)
        metrics = self._wait([t.train.remote(rollout_id, ref) for t in self.trainers], "train")
        return metrics[0]

    def sync_weights(self, version: int) -> dict:
        stats = ws.sync_weights(self.trainers, self.engines, version, self.args.phase_timeout)
        self.weight_version = version
        return stats

    def save(self, path: str) -> None:
        self._wait([t.save.remote(path) for t in self.trainers], "save checkpoint")

    def load(self, path: str) -> None:
        self._wait([t.load.remote(path) for t in self.trainers], "load checkpoint")

    def export_hf(self, path: str) -> None:
        self._wait([t.export_hf.remote(path) for t in self.trainers], "HF export")

    def offload_trainers(self) -> None:
        self._wait([t.offload.remote() for t in self.trainers], "trainer offload")

    def onload_trainers(self) -> None:
        self._wait([t.onload.remote() for t in self.trainers], "trainer onload")

    def sleep_engines(self) -> None:
        self._wait([e.sleep.remote() for e in self.engines], "engine sleep")

    def wake_engines(self) -> None:
        self._wait([e.wake_up.remote() for e in self.engines], "engine wake-up")

    def engine_versions(self) -> list[str]:
        return self._wait([e.weight_version.remote() for e in self.engines], "engine weight versions")

    def trainer_weights(self) -> dict:
        return self._wait([t.get_weights.remote() for t in self.trainers], "read trainer weights")[0]

    def engine_weights(self, index: int = 0) -> dict:
        return self._wait([self.engines[index].get_weights.remote()], "read engine weights")[0]

    def check_weights_equal(self) -> None:
        """--check-weight-update-equal: every engine's tensors equal the trainer's, name by name."""
        ref = self.trainer_weights()
        for i in range(len(self.engines)):
            got = self.engine_weights(i)
            missing = sorted(set(ref) ^ set(got))
            if missing:
                raise RuntimeError(f"engine {i}: weight names differ from the trainer's: {missing[:5]}")
            for name, t in ref.items():
                t = t.to(got[name].dtype)  # the engine may serve in bf16 while the trainer keeps fp32 masters
                if not (got[name].shape == t.shape and got[name].equal(t)):
                    diff = (got[name].float() - t.float()).abs().max().item() if got[name].shape == t.shape else None
                    raise RuntimeError(f"engine {i}: {name} differs from the trainer's (max abs diff {diff})")

    # ---- teardown -------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self.router is not None:
            self.router.stop()
        for e in self.engines:
            try:
                ray.get(e.shutdown.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - best effort
                pass
        for a in self.engines + self.trainers:
            ray.kill(a)
        self.engines, self.trainers = [], []
        self.placement.remove()
