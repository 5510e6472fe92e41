"""`miles train`: the RL loop (rollout → rewards → train → weight sync), synchronous or one-step-off async.

Reads like slime's train.py:

    for rollout_id in range(start, num_rollout):
        samples = generate(rollout_id)          # rollout function; rewards are computed inside it
        train(rollout_id, samples)              # every trainer rank gets the whole batch
        sync_weights(version=rollout_id + 1)    # engines now serve the new policy
        eval / save / log

`--async` (disaggregated only) starts generating step k+1 before training step k, so generation of k+1
uses weights at most one update old; weights are pushed every `--update-weights-interval` steps while
generation pauses between two engine steps.

Step metrics go to `<run dir>/metrics.jsonl` (one `{"kind": "train", "step": rollout_id, ...}` line per
step; eval lines are `{"kind": "eval", "step": <updates done>, ...}`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from miles.cluster import checkpoint as ckpt
from miles.cluster.phase import LocalTask, run_local
from miles.cluster.tracking import MetricsLogger, Progress

logger = logging.getLogger(__name__)


# ---- samples ------------------------------------------------------------------------------------


def flatten(groups: list) -> list:
    out = []
    for g in groups:
        out.extend(flatten(g) if isinstance(g, list) else [g])
    return out


def to_train_batch(args: Any, samples: list) -> list[dict]:
    """Rollout `Sample`s → the trainer's per-sample records (`miles.trainer.batch.TrainSample` fields).

    With `--custom-reward-post-process-path`, its `rewards` are sent as per-token advantages (slime's GRPO
    broadcasts the post-processed reward over the response), so the trainer's estimator does not run.
    """
    advantages = None
    post = getattr(args, "custom_reward_post_process_path", None)
    if post:
        from miles.rollout.hooks import load_function

        _raw, rewards = load_function(post)(args, samples)
        if len(rewards) != len(samples):
            raise ValueError(f"{post} returned {len(rewards)} rewards for {len(samples)} samples")
        advantages = [[float(r)] * s.response_length for r, s in zip(rewards, samples)]
    batch = []
    for i, s in enumerate(samples):
        mask = list(s.loss_mask) if s.loss_mask is not None else [1] * s.response_length
        batch.append(
            {
                "tokens": list(s.tokens),
                "response_length": s.response_length,
                "loss_mask": mask,
                "reward": s.get_reward_value(args),
                "rollout_log_probs": list(s.rollout_log_probs) if s.rollout_log_probs is not None else None,
                "group_index": s.group_index,
                "advantages": advantages[i] if advantages is not None else None,
                "remove_sample": bool(getattr(s, "remove_sample", False)),  # in group stats, trains no token
            }
        )
    return batch


def save_debug_rollout_data(template: str, rollout_id: Any, samples: list) -> str:
    """slime's dump: `torch.save({"rollout_id", "samples": [Sample.to_dict()]}, template.format(rollout_id=...))`."""
    path = template.format(rollout_id=rollout_id)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"rollout_id": rollout_id, "samples": [s.to_dict() for s in samples]}, path)
    return path


def load_debug_rollout_data(template: str, rollout_id: int, subsample: float | None = None) -> list:
    from miles.rollout.sample import Sample

    path = template.format(rollout_id=rollout_id)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--load-debug-rollout-data: {path} (step {rollout_id}) does not exist")
    data = torch.load(path, weights_only=False)
    samples = [Sample.from_dict(d) for d in data["samples"]]
    if subsample is not None and subsample < 1:
        keep = max(1, int(len(samples) * subsample))
        samples = samples[: (keep + 1) // 2] + samples[len(samples) - keep // 2 :]
    return samples


# ---- the loop -------------------------------------------------------------------------------------


class RLLoop:
    def __init__(self, args: Any, cluster: Any, data_source: Any, num_rollout: int):
        self.args, self.cluster, self.data_source, self.num_rollout = args, cluster, data_source, num_rollout
        self.metrics = MetricsLogger(args)
        self.progress: Progress | None = None
        self.history: list[dict] = []
        self.timeout = args.phase_timeout
        self.colocate = bool(args.colocate)

    # ---- phases -------------------------------------------------------------------------------
    def _actors(self) -> list:
        return self.cluster.trainers + self.cluster.engines

    def generate(self, rollout_id: int) -> tuple[list, dict]:
        """One rollout step's samples (flat) and rollout metrics."""
        args = self.args
        t0 = time.perf_counter()
        if args.load_debug_rollout_data:
            from miles.rollout.metrics import sample_metrics

            samples = load_debug_rollout_data(args.load_debug_rollout_data, rollout_id,
                                              args.load_debug_rollout_data_subsample)
            metrics = sample_metrics(args, samples)
        else:
            from miles.rollout.rollout import call_rollout_function

            out = call_rollout_function(args.rollout_function_path, args, rollout_id, self.data_source, False)
            samples, metrics = flatten(out.samples), dict(out.metrics or {})
        if args.save_debug_rollout_data:
            save_debug_rollout_data(args.save_debug_rollout_data, rollout_id, samples)
        metrics["perf/rollout_seconds"] = time.perf_counter() - t0
        if "rollout/reward_seconds" in metrics:
            metrics["perf/reward_seconds"] = metrics["rollout/reward_seconds"]
        log_fn = getattr(args, "custom_rollout_log_function_path", None)
        if log_fn:
            from miles.rollout.hooks import load_function

            if load_function(log_fn)(rollout_id, args, samples, metrics, time.perf_counter() - t0):
                metrics = {k: v for k, v in metrics.items() if not k.startswith("rollout/")}  # hook logged them
        metrics["rollout/num_samples"] = len(samples)
        versions = sorted({v for s in samples for v in s.weight_versions}, key=_version_key)
        metrics["rollout/weight_versions"] = versions
        if versions and all(str(v).isdigit() for v in versions):  # updates the oldest token lagged behind
            metrics["rollout/max_staleness"] = rollout_id - int(versions[0])
        return samples, metrics

    def train(self, rollout_id: int, samples: list) -> dict:
        t0 = time.perf_counter()
        if self.colocate and self.args.offload_rollout:
            self.cluster.sleep_engines()
        if self.colocate and self.args.offload_train:
            self.cluster.onload_trainers()
        raw = self.cluster.train(rollout_id, to_train_batch(self.args, samples))
        out = {(k if "/" in k else f"train/{k}"): v for k, v in raw.items()}
        out["perf/train_seconds"] = time.perf_counter() - t0
        return out

    def update_weights(self, version: int) -> dict:
        if not self.cluster.engines and not self.cluster.engine_urls:
            return {}
        if self.colocate and self.args.offload_rollout:
            self.cluster.wake_engines()
        stats = self.cluster.sync_weights(version)
        if self.args.check_weight_update_equal:
            self.cluster.check_weights_equal()
        if self.colocate and self.args.offload_train:
            self.cluster.offload_trainers()
        return stats

    def evaluate(self, updates_done: int, rollout_id: int) -> dict:
        from miles.rollout.rollout import call_rollout_function

        args = self.args
        t0 = time.perf_counter()
        path = args.eval_function_path or args.rollout_function_path
        out = run_local(
            lambda: call_rollout_function(path, args, rollout_id, self.data_source, True),
            "eval", self.timeout, self._actors(), args.run_dir,
        )
        metrics = dict(out.metrics or {})
        log_fn = args.custom_eval_rollout_log_function_path
        if log_fn:
            from miles.rollout.hooks import load_function

            if load_function(log_fn)(rollout_id, args, out.data, metrics):
                metrics = {"eval/logged_by_hook": True}
        for name, d in out.data.items():
            rewards = d.get("rewards") or []
            if rewards and not metrics.get("eval/logged_by_hook") and f"eval/{name}" not in metrics:
                metrics[f"eval/{name}"] = sum(rewards) / len(rewards)
                truncated = d.get("truncated") or []
                metrics[f"eval/{name}-truncated_ratio"] = sum(map(bool, truncated)) / max(1, len(truncated))
        if args.save_debug_rollout_data:
            save_debug_rollout_data(args.save_debug_rollout_data, f"eval_{updates_done}",
                                    [s for d in out.data.values() for s in d.get("samples", [])])
        metrics["perf/eval_seconds"] = time.perf_counter() - t0
        self.metrics.log(updates_done, {"kind": "eval", **metrics})
        return metrics

    def save(self, rollout_id: int, loop_state: dict) -> None:
        """Checkpoint after step `rollout_id`: trainer state + loop state (+ HF export with --save-hf)."""
        args = self.args
        tmp = ckpt.begin_save(args.save, rollout_id + 1)
        if self.cluster.trainers:
            self.cluster.save(str(tmp / "trainer"))
        ckpt.commit_save(args.save, rollout_id + 1, tmp, loop_state)
        if args.save_hf and self.cluster.trainers:
            self.cluster.export_hf(args.save_hf.format(rollout_id=rollout_id))

    def loop_state(self, next_rollout_id: int) -> dict:
        return {
            "next_rollout_id": next_rollout_id,
            "weight_version": next_rollout_id,
            "data_source": ckpt.data_source_state(self.data_source, next_rollout_id - 1),
            "rng": ckpt.rng_state(),
        }

    def maybe_load(self) -> int:
        """Resume from --load (trainer, data cursor + buffer, RNG, step); returns the first rollout id."""
        args = self.args
        start = 0
        if args.load:
            try:
                path = ckpt.latest_checkpoint(args.load)
            except FileNotFoundError:
                # slime's auto-resume pattern `--save D --load D`: the first launch finds no checkpoint yet
                if args.load != args.save or (os.path.isdir(args.load) and os.listdir(args.load)):
                    raise
                logger.warning("--load %s has no checkpoint yet: starting from --hf-checkpoint", args.load)
                path = None
            if path is not None:
                state = ckpt.load_loop_state(path)
                if self.cluster.trainers:
                    self.cluster.load(str(path / "trainer"))
                ckpt.restore_data_source(self.data_source, state["data_source"], state["next_rollout_id"] - 1)
                ckpt.set_rng_state(state["rng"])
                start = state["next_rollout_id"]
                logger.info("resumed from %s at step %d", path, start)
                if self.cluster.trainers:
                    self.update_weights(start)  # engines were started from --hf-checkpoint
        if args.start_rollout_id is not None:
            start = args.start_rollout_id
        return start

    # ---- step bookkeeping ----------------------------------------------------------------------
    def finish_step(self, rollout_id: int, metrics: dict, loop_state: dict | None, t_step: float) -> None:
        args = self.args
        updates = rollout_id + 1
        if args.eval_interval and updates % args.eval_interval == 0 and not args.debug_train_only:
            with self.progress.phase("eval", rollout_id):
                self.evaluate(updates, rollout_id)
        last = rollout_id == self.num_rollout - 1
        if args.save and ((args.save_interval and updates % args.save_interval == 0) or last):
            t0 = time.perf_counter()
            with self.progress.phase("save", rollout_id):
                self.save(rollout_id, loop_state or self.loop_state(rollout_id + 1))
            metrics["perf/save_seconds"] = time.perf_counter() - t0
        metrics["perf/step_seconds"] = time.perf_counter() - t_step
        record = {"kind": "train", **metrics}
        self.metrics.log(rollout_id, record)
        self.history.append({"step": rollout_id, **record})
        self.progress.advance(_summary(rollout_id, metrics))

    # ---- loops ---------------------------------------------------------------------------------
    def train_and_sync(self, rollout_id: int, samples: list, metrics: dict) -> None:
        """Train on one rollout, then push weights to the engines every --update-weights-interval steps."""
        with self.progress.phase("train", rollout_id):
            metrics.update(self.train(rollout_id, samples))
        if (rollout_id + 1) % self.args.update_weights_interval == 0:
            with self.progress.phase("weight sync", rollout_id):
                metrics.update(self.update_weights(rollout_id + 1))

    def run(self) -> list[dict]:
        args = self.args
        start = self.maybe_load()
        self.progress = Progress(self.num_rollout, start, enabled=not args.no_progress)
        try:
            if self.colocate and args.offload_train and self.cluster.trainers:
                self.cluster.offload_trainers()
            if args.eval_interval and not args.skip_eval_before_train and not args.debug_train_only and start == 0:
                with self.progress.phase("eval", start):
                    self.evaluate(0, start)
            if args.async_train:
                self._async_loop(start)
            else:
                self._sync_loop(start)
        finally:
            self.progress.close()
            self.metrics.close()
        return self.history

    def _sync_loop(self, start: int) -> None:
        args = self.args
        for rollout_id in range(start, self.num_rollout):
            t_step = time.perf_counter()
            with self.progress.phase("rollout", rollout_id):
                samples, metrics = run_local(lambda rid=rollout_id: self.generate(rid), "rollout", self.timeout,
                                             self._actors(), args.run_dir)
            if not args.debug_rollout_only:
                self.train_and_sync(rollout_id, samples, metrics)
            self.finish_step(rollout_id, metrics, None, t_step)

    def _async_loop(self, start: int) -> None:
        """One-step-off: rollout k+1 runs on a driver thread while step k trains and syncs."""
        args = self.args

        def submit(rid: int) -> LocalTask | None:
            return LocalTask(lambda: self.generate(rid), "rollout") if rid < self.num_rollout else None

        task = submit(start)
        for rollout_id in range(start, self.num_rollout):
            t_step = time.perf_counter()
            with self.progress.phase("rollout (wait)", rollout_id):
                samples, metrics = task.result(self.timeout, self._actors(), args.run_dir)
            state = self.loop_state(rollout_id + 1)  # before rollout k+1 draws prompts: what a resume restarts
            task = submit(rollout_id + 1)
            self.train_and_sync(rollout_id, samples, metrics)
            self.finish_step(rollout_id, metrics, state, t_step)


def _version_key(v: str) -> tuple:
    return (0, int(v), "") if str(v).isdigit() else (1, 0, str(v))


def _summary(rollout_id: int, m: dict) -> str:
    parts = [f"step {rollout_id}"]
    for key, label in (("rollout/reward_mean", "reward"), ("rollout/response_len_mean", "len"),
                       ("train/loss", "loss"), ("train/pg_loss", "pg_loss"), ("perf/step_seconds", "s")):
        if key in m and isinstance(m[key], (int, float)):
            parts.append(f"{label} {m[key]:.4g}")
    return " | ".join(parts)


# ---- entry point --------------------------------------------------------------------------------


def make_data_source(args: Any) -> Any:
    if args.load_debug_rollout_data:
        return None
    from miles.rollout.hooks import load_function

    return load_function(args.data_source_path)(args)


def resolve_num_rollout(args: Any, data_source: Any) -> int:
    if args.num_rollout is not None:
        return args.num_rollout
    if data_source is None or not hasattr(data_source, "__len__"):
        raise ValueError("--num-epoch needs a data source with a length; set --num-rollout")
    per_epoch = len(data_source) // args.rollout_batch_size
    if per_epoch == 0:
        raise ValueError(f"--num-epoch: {len(data_source)} prompts < --rollout-batch-size {args.rollout_batch_size}")
    args.num_rollout = args.num_epoch * per_epoch
    return args.num_rollout


def prepare_run_dir(args: Any) -> str:
    if not args.run_dir:
        args.run_dir = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    args.run_dir = os.path.abspath(args.run_dir)
    os.makedirs(args.run_dir, exist_ok=True)
    for name in ("save", "load", "hf_checkpoint", "update_weight_disk_dir"):
        if getattr(args, name, None):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    return args.run_dir


def run_training(args: Any) -> list[dict]:
    """Start Ray and the cluster, run the loop, tear everything down; returns the per-step metrics."""
    from miles.cluster.cluster import Cluster
    from miles.cluster.phase import enable_stack_dump_signal
    from miles.cluster.placement import init_ray

    prepare_run_dir(args)
    enable_stack_dump_signal()
    torch.manual_seed(args.seed)
    data_source = make_data_source(args)
    num_rollout = resolve_num_rollout(args, data_source)
    init_ray(args.ray_num_cpus)
    cluster = Cluster.start(args)
    try:
        return RLLoop(args, cluster, data_source, num_rollout).run()
    finally:
        cluster.shutdown()
