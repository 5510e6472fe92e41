"""Ray start-up and placement groups for trainer ranks and rollout engines.

One placement group holds every device the job uses, as one bundle per device:

* disaggregated: `actor_num_nodes * actor_num_gpus_per_node` trainer bundles, then `rollout_num_gpus`
  engine bundles (slime's layout);
* colocated (`--colocate`): `max(trainer devices, rollout devices)` bundles shared by both: each trainer
  rank and each engine asks for half of its bundle.

A bundle is `{"GPU": 1, "CPU": 1}` on GPU machines and `{"CPU": 1}` on CPU-only ones, so on a laptop the
same flags place CPU processes: a "GPU" count means one CPU process slot. An engine spanning several
devices (`--rollout-num-gpus-per-engine > 1`) gets one bundle with that many GPUs (disaggregated only).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None, runtime_env: dict | None = None) -> None:
    """Join the cluster at `RAY_ADDRESS` if set, else start a local one (no dashboard). Idempotent."""
    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH")] if p)}}
    if runtime_env:
        env.update(runtime_env)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=True)


def resolve_device(device: str) -> str:
    """`auto` → cuda when the Ray cluster has GPUs, else cpu."""
    if device != "auto":
        return device
    return "cuda" if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


@dataclass
class Slot:
    """Where one actor goes: a bundle of the placement group and the fraction of it the actor takes."""

    bundle: int
    num_cpus: float
    num_gpus: float

    def options(self, pg: PlacementGroup) -> dict[str, Any]:
        return {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=self.bundle
            ),
        }


@dataclass
class Placement:
    pg: PlacementGroup | None
    device: str
    trainer_slots: list[Slot] = field(default_factory=list)
    engine_slots: list[Slot] = field(default_factory=list)

    def remove(self) -> None:
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


def plan_bundles(
    device: str,
    num_trainers: int,
    num_engines: int,
    gpus_per_engine: int,
    colocate: bool,
) -> tuple[list[dict[str, float]], list[Slot], list[Slot]]:
    """Bundles and actor slots (pure function; see the module docstring)."""
    gpu = device == "cuda"

    def bundle(devices: int) -> dict[str, float]:
        return {"GPU": float(devices), "CPU": 1.0} if gpu else {"CPU": float(devices)}

    if colocate:
        if gpus_per_engine != 1 and num_engines:
            raise ValueError("--colocate supports --rollout-num-gpus-per-engine 1 only")
        n = max(num_trainers, num_engines)
        bundles = [bundle(1) for _ in range(n)]
        share = 0.5
        trainers = [Slot(i, share if not gpu else 0.0, share if gpu else 0.0) for i in range(num_trainers)]
        engines = [Slot(i, share if not gpu else 0.0, share if gpu else 0.0) for i in range(num_engines)]
        return bundles, trainers, engines
    bundles = [bundle(1) for _ in range(num_trainers)] + [bundle(gpus_per_engine) for _ in range(num_engines)]
    trainers = [Slot(i, 0.0 if gpu else 1.0, 1.0 if gpu else 0.0) for i in range(num_trainers)]
    engines = [
        Slot(num_trainers + i, 0.0 if gpu else float(gpus_per_engine), float(gpus_per_engine) if gpu else 0.0)
        for i in range(num_engines)
    ]
    return bundles, trainers, engines


def create_placement(args: Any, timeout: float = 600.0) -> Placement:
    """Reserve the job's devices (waits at most `timeout` s for the cluster to have them)."""
    device = resolve_device(getattr(args, "device", "auto"))
    num_trainers = 0 if args.debug_rollout_only else args.actor_num_nodes * args.actor_num_gpus_per_node
    external = bool(getattr(args, "rollout_external_engine_addrs", None))
    num_engines = 0
    if not args.debug_train_only and not external:
        num_engines = args.rollout_num_gpus // args.rollout_num_gpus_per_engine
    bundles, trainers, engines = plan_bundles(
        device, num_trainers, num_engines, args.rollout_num_gpus_per_engine, bool(args.colocate)
    )
    if not bundles:
        return Placement(None, device)
    pg = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout)
    if not ready:
        remove_placement_group(pg)
        raise TimeoutError(
            f"placement: the Ray cluster could not provide {len(bundles)} bundles {bundles[0]} within {timeout:.0f}s "
            f"(available: {ray.available_resources()}); lower --actor-num-gpus-per-node / --rollout-num-gpus"
        )
    logger.info("placement: %d bundles on %s (%d trainer ranks, %d engines)", len(bundles), device, num_trainers,
                num_engines)
    return Placement(pg, device, trainers, engines)
