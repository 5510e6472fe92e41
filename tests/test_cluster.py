"""Placement planning, bounded phases (timeouts dump stacks, errors name the phase), loop checkpoints, CLI."""

from __future__ import annotations

import os
import time

import pytest
import torch

from miles.cluster import checkpoint as ckpt
from miles.cluster.phase import LocalTask, PhaseError, PhaseTimeout, run_local
from miles.cluster.placement import plan_bundles


def test_plan_bundles_disaggregated_cpu():
    bundles, trainers, engines = plan_bundles("cpu", num_trainers=2, num_engines=2, gpus_per_engine=1,
                                              colocate=False)
    assert bundles == [{"CPU": 1.0}] * 4
    assert [(s.bundle, s.num_cpus, s.num_gpus) for s in trainers] == [(0, 1.0, 0.0), (1, 1.0, 0.0)]
    assert [(s.bundle, s.num_cpus) for s in engines] == [(2, 1.0), (3, 1.0)]


def test_plan_bundles_colocated_gpu_shares_devices():
    bundles, trainers, engines = plan_bundles("cuda", num_trainers=4, num_engines=2, gpus_per_engine=1,
                                              colocate=True)
    assert bundles == [{"GPU": 1.0, "CPU": 1.0}] * 4
    assert [(s.bundle, s.num_gpus) for s in trainers] == [(i, 0.5) for i in range(4)]
    assert [(s.bundle, s.num_gpus) for s in engines] == [(0, 0.5), (1, 0.5)]


def test_plan_bundles_tensor_parallel_engines():
    bundles, _, engines = plan_bundles("cuda", num_trainers=2, num_engines=2, gpus_per_engine=2, colocate=False)
    assert bundles[2:] == [{"GPU": 2.0, "CPU": 1.0}] * 2
    assert [(s.bundle, s.num_gpus) for s in engines] == [(2, 2.0), (3, 2.0)]
    with pytest.raises(ValueError, match="--colocate supports --rollout-num-gpus-per-engine 1"):
        plan_bundles("cuda", 2, 1, 2, colocate=True)


def _sleepy_phase():
    time.sleep(3600)


def test_run_local_timeout_dumps_stacks(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(PhaseTimeout, match="phase 'rollout' did not finish within 1s"):
        run_local(_sleepy_phase, "rollout", 1.0, run_dir=str(tmp_path))
    assert time.monotonic() - t0 < 10
    (report,) = tmp_path.glob("stacks-rollout-*.txt")
    assert "_sleepy_phase" in report.read_text()


def test_run_local_error_names_phase():
    def boom():
        raise KeyError("no such prompt")

    with pytest.raises(PhaseError, match="phase 'train' failed: KeyError"):
        run_local(boom, "train", 10.0)
    assert LocalTask(lambda: 41 + 1, "x").result(10.0) == 42


def test_checkpoint_commit_and_latest(tmp_path):
    for step in (2, 4):
        tmp = ckpt.begin_save(str(tmp_path), step)
        (tmp / "trainer").mkdir()
        ckpt.commit_save(str(tmp_path), step, tmp, {"next_rollout_id": step, "rng": ckpt.rng_state()})
    assert (tmp_path / "latest").read_text().strip() == "iter_0000004"
    assert ckpt.latest_checkpoint(str(tmp_path)).name == "iter_0000004"
    assert ckpt.latest_checkpoint(str(tmp_path / "iter_0000002")).name == "iter_0000002"
    state = ckpt.load_loop_state(ckpt.latest_checkpoint(str(tmp_path)))
    assert state["next_rollout_id"] == 4
    ckpt.set_rng_state(state["rng"])
    expected = torch.rand(3)
    torch.rand(5)  # the RNG moves on; restoring the saved state replays the same draws
    ckpt.set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected)
    assert not list(tmp_path.glob(".tmp_*"))
    tmp = ckpt.begin_save(str(tmp_path), 6)  # a save killed before commit leaves `latest` untouched
    assert ckpt.latest_checkpoint(str(tmp_path)).name == "iter_0000004"
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        ckpt.latest_checkpoint(str(tmp / "trainer_missing"))


def test_num_epoch_sets_num_rollout():
    import argparse

    from miles.cluster.loop import resolve_num_rollout

    args = argparse.Namespace(num_rollout=None, num_epoch=3, rollout_batch_size=4)
    assert resolve_num_rollout(args, list(range(10))) == 6 and args.num_rollout == 6  # 3 x (10 // 4)
    with pytest.raises(ValueError, match="3 prompts < --rollout-batch-size 4"):
        resolve_num_rollout(argparse.Namespace(num_rollout=None, num_epoch=1, rollout_batch_size=4), [1, 2, 3])


def test_train_cli_reports_config_errors(capsys):
    from miles.cli import main

    assert main(["train", "--rollout-batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "--hf-checkpoint" in err and "--num-rollout or --num-epoch" in err
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "cluster:" in out and "checkpoint:" in out and "--colocate" in out


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    here = os.path.dirname(os.path.abspath(__file__))  # actors below are defined in this module
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"PYTHONPATH": here}})
    yield ray
    ray.shutdown()


class _Worker:
    def work(self, seconds: float) -> str:
        time.sleep(seconds)
        return "done"

    def fail(self) -> None:
        raise ValueError("trainer rank exploded")

    def dump_stacks(self) -> str:
        from miles.cluster.phase import dump_all_stacks

        return dump_all_stacks()


@pytest.mark.slow
def test_wait_refs_timeout_and_failure_name_the_phase(ray_cluster, tmp_path):
    from miles.cluster.phase import wait_refs

    ray = ray_cluster
    actor = ray.remote(_Worker).options(max_concurrency=2, num_cpus=0).remote()
    assert wait_refs([actor.work.remote(0)], "warm-up", 60) == ["done"]
    t0 = time.monotonic()
    with pytest.raises(PhaseTimeout, match="phase 'weight sync': 1 of 1 remote calls did not finish within 1s"):
        wait_refs([actor.work.remote(3600)], "weight sync", 1.0, [actor], str(tmp_path))
    assert time.monotonic() - t0 < 30
    (report,) = tmp_path.glob("stacks-weight_sync-*.txt")
    assert "in work" in report.read_text()  # the actor's stack shows where it is stuck
    with pytest.raises(PhaseError, match="(?s)phase .train. failed: .*trainer rank exploded"):
        wait_refs([actor.fail.remote()], "train", 60)
    ray.kill(actor)


def halve(args, samples):
    raw = [s.reward for s in samples]
    return raw, [r / 2 for r in raw]


def test_to_train_batch_masks_rewards_and_post_process():
    import argparse

    from miles.cluster.loop import to_train_batch
    from miles.rollout.sample import Sample

    samples = [Sample(tokens=[1, 2, 3, 4], response_length=2, reward={"score": 1.0}, group_index=0,
                      rollout_log_probs=[-0.5, -0.25]),
               Sample(tokens=[1, 2, 5], response_length=1, reward={"score": 0.0}, group_index=0, loss_mask=[1],
                      remove_sample=True)]
    args = argparse.Namespace(reward_key="score", custom_reward_post_process_path=None)
    batch = to_train_batch(args, samples)
    assert batch[0] == {"tokens": [1, 2, 3, 4], "response_length": 2, "loss_mask": [1, 1], "reward": 1.0,
                        "rollout_log_probs": [-0.5, -0.25], "group_index": 0, "advantages": None,
                        "remove_sample": False}
    assert batch[1]["remove_sample"] is True and batch[1]["reward"] == 0.0  # the trainer masks it, keeps its reward
    from miles.trainer.batch import validate_batch

    checked = validate_batch(batch, vocab_size=16, n_samples_per_prompt=2)  # the trainer accepts the records
    assert [s.remove_sample for s in checked] == [False, True]
    for s in samples:
        s.reward = 3.0
    args.custom_reward_post_process_path = "test_cluster.halve"
    batch = to_train_batch(args, samples)
    assert [b["advantages"] for b in batch] == [[1.5, 1.5], [1.5]]
