"""`miles train` end to end on CPU with real local Ray, tiny models and real engines/servers.

One `ray.init(num_cpus=2)` for the module; each run places 1 trainer rank + 1 engine (or shares one
slot with --colocate) and trains 2-4 GRPO steps on 4 samples of <= 6 tokens.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")


# ---- hooks used by the runs (loaded by dotted path, slime-style; they run in this driver process) ----


async def length_rm(args, sample):
    """A reward with variance inside a group: depends on the sampled tokens."""
    return float(sum(sample.tokens[-sample.response_length:]) % 3 == 0)


async def even_token_rm(args, sample):
    """Fraction of even token ids in the response: learnable by a tiny random model in a few steps."""
    resp = sample.tokens[-sample.response_length:]
    return sum(t % 2 == 0 for t in resp) / max(1, len(resp))


async def seeded_generate(args, sample, sampling_params):
    """Default generate with a per-sample seed: sampling is a pure function of (weights, prompt, index)."""
    from miles.rollout.generate import generate

    return await generate(args, sample, dict(sampling_params, sampling_seed=1000 + sample.index))


async def flaky_rm(args, sample):
    """Raises for index % 4 == 1, never returns for index % 4 == 2, else 1.0."""
    if sample.index % 4 == 1:
        raise ValueError("reward exploded")
    if sample.index % 4 == 2:
        await asyncio.sleep(3600)
    return 1.0


LOGGED: list = []


def log_hook(rollout_id, args, samples, extra_metrics, rollout_time):
    """slime's --custom-rollout-log-function-path signature; False keeps the default metrics."""
    LOGGED.append((rollout_id, len(samples), "rollout/reward_mean" in extra_metrics, rollout_time >= 0))
    return False


def post_process(args, samples):
    """slime's --custom-reward-post-process-path: Dr.GRPO-style mean-only normalization per group."""
    raw = [s.get_reward_value(args) for s in samples]
    out = []
    for s, r in zip(samples, raw):
        group = [x for t, x in zip(samples, raw) if t.group_index == s.group_index]
        out.append(r - sum(group) / len(group))
    return raw, out


def remove_first_of_group(args, data):
    """slime's --rollout-sample-filter-path: `fn(args, groups) -> None`, marks samples `remove_sample`."""
    for group in data:
        group[0].remove_sample = True


def stuck_rollout(args, rollout_id, data_source, evaluation=False):
    time.sleep(3600)


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from miles.testing import make_checkpoint

    root = tmp_path_factory.mktemp("train")
    ckpt = make_checkpoint(root / "ckpt", "qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    moe = make_checkpoint(root / "moe", "qwen3_moe", hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input": f"What is {i} + {i}?", "label": str(2 * i)}) + "\n"
                               for i in range(12)))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield {"root": root, "ckpt": str(ckpt), "moe": str(moe), "prompts": str(prompts)}
    ray.shutdown()


def _argv(env, run: str, *extra: str, steps: int = 2) -> list[str]:
    return [
        "--hf-checkpoint", env["ckpt"], "--prompt-data", env["prompts"], "--label-key", "label",
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "6",
        "--num-rollout", str(steps), "--custom-rm-path", "test_train.length_rm", "--lr", "1e-2",
        "--engine-kv-cache-tokens", "2048", "--engine-max-num-seqs", "8", "--phase-timeout", "120",
        "--engine-startup-timeout", "180", "--run-dir", str(env["root"] / run), "--no-progress", *extra,
    ]


def _train(argv: list[str]) -> list[dict]:
    from miles.cluster.loop import run_training
    from miles.config import parse_config

    return run_training(parse_config(argv).args)


def _records(env, run: str, kind: str = "train") -> list[dict]:
    lines = (env["root"] / run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def _check_on_policy(hist: list[dict]) -> None:
    for step, m in enumerate(hist):
        assert m["weight_sync/version"] == step + 1  # engines bumped their version after every update
        assert m["rollout/weight_versions"] == [str(step)]  # step k generated with the weights after k updates
        assert m["train/train_rollout_logprob_abs_diff"] < 1e-4  # engine and trainer agree
        assert m["rollout/num_samples"] == 4


# ---- tests ----------------------------------------------------------------------------------------


def test_sync_disaggregated_collective(env):
    LOGGED.clear()
    hist = _train(_argv(env, "disagg", "--check-weight-update-equal", "--custom-rollout-log-function-path",
                        "test_train.log_hook", "--custom-reward-post-process-path", "test_train.post_process"))
    assert [m["step"] for m in hist] == [0, 1]
    _check_on_policy(hist)
    assert LOGGED == [(0, 4, True, True), (1, 4, True, True)]
    assert _records(env, "disagg")[1]["train/step"] == 2.0


def test_sync_colocated_ipc_two_ranks_two_engines(env):
    """2 FSDP ranks (gloo) sharing their 2 slots with 2 engines behind `miles router`; eval and tensorboard."""
    hist = _train(_argv(env, "coloc", "--colocate", "--actor-num-gpus-per-node", "2", "--check-weight-update-equal",
                        "--eval-interval", "1", "--eval-prompt-data", "heldout", env["prompts"], "--use-tensorboard"))
    _check_on_policy(hist)
    assert hist[0]["weight_sync/tensors"] > 0
    evals = _records(env, "coloc", "eval")
    assert [r["step"] for r in evals] == [0, 1, 2]  # before training, then after each update
    assert all(0.0 <= r["eval/heldout"] <= 1.0 and "eval/heldout/pass@1" in r for r in evals)
    assert list((env["root"] / "coloc" / "tensorboard").glob("events.out.tfevents.*"))
    assert (env["root"] / "coloc" / "router.log").exists()


def test_sync_disk_transport(env):
    hist = _train(_argv(env, "disk", "--update-weight-transport", "disk", "--check-weight-update-equal",
                        "--rollout-sample-filter-path", "test_train.remove_first_of_group", steps=1))
    _check_on_policy(hist)
    m = hist[0]  # the removed first sample of each group trains no token; the step still runs
    assert m["train/step"] == 1.0 and 0 < m["train/train_tokens"] < m["rollout/response_len_mean"] * 4


def test_async_one_step_off_moe(env):
    """Qwen3-MoE (stacked experts in the trainer, HF names on the wire), many small buckets."""
    hist = _train(_argv(env, "async", "--async", "--check-weight-update-equal", "--hf-checkpoint", env["moe"],
                        "--update-weight-buffer-size", "20000", steps=3))
    assert [m["weight_sync/version"] for m in hist] == [1, 2, 3]
    assert hist[0]["weight_sync/buckets"] > 5 and hist[0]["train/train_rollout_logprob_abs_diff"] < 1e-4
    # rollout k+1 starts before update k+1 lands: it generates with version k or k+1 (never older)
    for step, m in enumerate(hist):
        versions = [int(v) for v in m["rollout/weight_versions"]]
        assert versions and min(versions) >= max(0, step - 1) and max(versions) <= step, (step, versions)
        assert m["rollout/max_staleness"] == step - min(versions) in (0, 1)


def test_resume_continues_exactly(env):
    full = _train(_argv(env, "full", "--custom-generate-function-path", "test_train.seeded_generate",
                        "--save", str(env["root"] / "ckpt_full"), "--save-interval", "2",
                        "--save-hf", str(env["root"] / "hf" / "step_{rollout_id}"), steps=4))
    for rid in (1, 3):  # --save-hf exports at every save
        hf = env["root"] / "hf" / f"step_{rid}"
        assert (hf / "config.json").exists() and list(hf.glob("*.safetensors")), rid
    resumed = _train(_argv(env, "resumed", "--custom-generate-function-path", "test_train.seeded_generate",
                           "--load", str(env["root"] / "ckpt_full" / "iter_0000002"), steps=4))
    assert [m["step"] for m in resumed] == [2, 3]
    keys = ["rollout/reward_mean", "rollout/response_len_mean", "train/loss", "train/pg_loss", "train/grad_norm",
            "train/entropy", "train/ppo_kl", "train/step", "weight_sync/version"]
    for a, b in zip(full[2:], resumed):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert full[2]["train/grad_norm"] != full[3]["train/grad_norm"]  # the compared values do change per step


def test_debug_rollout_data_roundtrip(env):
    dump = str(env["root"] / "dump" / "rollout_{rollout_id}.pt")
    live = _train(_argv(env, "dump_live", "--save-debug-rollout-data", dump))
    replay = _train(_argv(env, "dump_replay", "--load-debug-rollout-data", dump))
    keys = ["train/loss", "train/pg_loss", "train/grad_norm", "train/entropy", "rollout/reward_mean"]
    assert [{k: m[k] for k in keys} for m in live] == [{k: m[k] for k in keys} for m in replay]
    assert "weight_sync/version" not in replay[0]  # no engines in replay mode


def test_failing_and_hanging_rewards_do_not_stop_the_job(env):
    t0 = time.monotonic()
    hist = _train(_argv(env, "flaky", "--custom-rm-path", "test_train.flaky_rm", "--rm-timeout", "2",
                        "--rm-default-reward", "0.0", steps=1))
    assert time.monotonic() - t0 < 100
    m = hist[0]
    assert m["rollout/reward_errors"] >= 1 and m["rollout/reward_timeouts"] >= 1
    assert "reward exploded" in m["rollout/reward_first_error"]
    assert m["rollout/num_samples"] == 4 and m["rollout/reward_mean"] == 0.5  # indices 0..3: two scored 1.0


def test_stuck_phase_times_out_with_stacks(env):
    from miles.cluster.phase import PhaseTimeout

    run = env["root"] / "stuck"
    with pytest.raises(PhaseTimeout, match="phase 'rollout'"):
        _train(_argv(env, "stuck", "--rollout-function-path", "test_train.stuck_rollout", "--phase-timeout", "3",
                     "--debug-rollout-only"))
    stacks = list(run.glob("stacks-rollout-*.txt"))
    assert stacks and "stuck_rollout" in stacks[0].read_text()


def test_debug_rollout_only(env):
    hist = _train(_argv(env, "rollout_only", "--debug-rollout-only", steps=1))
    assert hist[0]["rollout/num_samples"] == 4
    assert not any(k.startswith(("train/", "weight_sync/")) for k in hist[0])


def test_external_engine_with_disk_sync(env):
    """--rollout-external-engine-addrs: Miles launches no engine, generates through the given server and
    syncs weights into it through the disk transport."""
    import httpx

    from miles.engine import EngineConfig, LLMEngine
    from miles.serve.launch import serve_engine

    server = serve_engine(LLMEngine(EngineConfig(model=env["ckpt"], kv_cache_tokens=2048, max_num_seqs=8)),
                          model_path=env["ckpt"])
    try:
        hist = _train(_argv(env, "external", "--rollout-external-engine-addrs", server.url.removeprefix("http://"),
                            steps=2))
        assert [m["weight_sync/version"] for m in hist] == [1, 2]
        assert [m["rollout/weight_versions"] for m in hist] == [["0"], ["1"]]
        assert httpx.get(server.url + "/get_weight_version").json()["weight_version"] == "2"
    finally:
        server.stop()


def test_partial_rollout_filter_buffer_is_checkpointed(env):
    """DAPO filter + over-sampling + --partial-rollout through real engines; `--save D --load D` auto-resume:
    the first launch starts fresh, the second continues after the saved step with the saved buffer."""
    from miles.cluster import checkpoint as ckpt

    save = str(env["root"] / "ckpt_partial")
    extra = ("--over-sampling-batch-size", "4", "--partial-rollout", "--save", save, "--load", save,
             "--save-interval", "1", "--dynamic-sampling-filter-path",
             "miles.rollout.filters.check_reward_nonzero_std")
    first = _train(_argv(env, "partial", *extra, steps=1))
    m = first[0]
    assert m["rollout/num_samples"] == 4 and m["rollout/groups_generated"] >= 2
    state = ckpt.load_loop_state(ckpt.latest_checkpoint(save))
    assert state["next_rollout_id"] == 1
    assert len(state["data_source"]["buffer"]) == m["rollout/buffer_length"]
    assert state["data_source"]["group_index"] == m["rollout/groups_generated"]
    second = _train(_argv(env, "partial2", *extra, steps=2))
    assert [r["step"] for r in second] == [1] and second[0]["weight_sync/version"] == 2


def test_cli_with_yaml_config_joins_running_cluster(env, tmp_path):
    """`miles train --config run.yaml` in a subprocess, joining this module's Ray cluster via RAY_ADDRESS;
    then `miles plot` on its run directory."""
    import os
    import subprocess
    import sys

    import yaml

    run_dir = tmp_path / "cli_run"
    cfg = {
        "cluster": {"engine_kv_cache_tokens": 2048, "engine_max_num_seqs": 8},
        "hf-checkpoint": env["ckpt"], "prompt_data": env["prompts"], "label_key": "label",
        "rollout_batch_size": 2, "n_samples_per_prompt": 2, "rollout_max_response_len": 6, "num_rollout": 1,
        "rm_type": "exact", "lr": 0.01, "run_dir": str(run_dir), "no_progress": True,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env_vars = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    cmd = [sys.executable, "-m", "miles.cli", "train", "--config", str(tmp_path / "run.yaml"), "--num-rollout", "2"]
    proc = subprocess.run(cmd, env=env_vars, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 steps done" in proc.stdout
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and records[1]["weight_sync/version"] == 2
    plot = subprocess.run([sys.executable, "-m", "miles.cli", "plot", str(run_dir)], capture_output=True, text=True,
                          timeout=120)
    assert plot.returncode == 0 and (run_dir / "plots" / "reward.png").exists(), plot.stderr


def test_async_resume_redraws_the_in_flight_rollout(env):
    """--async saves the data cursor from *before* the in-flight rollout k+1, so a resume regenerates step k+1
    from the same prompts (same sample indices) instead of skipping them."""
    import torch

    dump = str(env["root"] / "async_dump" / "{rollout_id}.pt")
    dump2 = str(env["root"] / "async_dump2" / "{rollout_id}.pt")
    save = str(env["root"] / "ckpt_async")
    _train(_argv(env, "async_full", "--async", "--save", save, "--save-interval", "1",
                 "--save-debug-rollout-data", dump, steps=3))
    resumed = _train(_argv(env, "async_resumed", "--async", "--load", save + "/iter_0000002",
                           "--save-debug-rollout-data", dump2, steps=3))
    assert [m["step"] for m in resumed] == [2] and resumed[0]["weight_sync/version"] == 3

    def prompts(path):
        return [(s["index"], s["prompt"]) for s in torch.load(path.format(rollout_id=2), weights_only=False)["samples"]]

    assert prompts(dump2) == prompts(dump)


def test_grpo_learns_a_toy_reward(env):
    """The whole loop optimizes: GRPO drives the even-token reward from ~0.5 towards 1 in a dozen steps."""
    argv = _argv(env, "learn", "--custom-rm-path", "test_train.even_token_rm", "--rollout-batch-size", "4",
                 "--n-samples-per-prompt", "8", "--lr", "3e-2", steps=12)
    rewards = [m["rollout/reward_mean"] for m in _train(argv)]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.7 and last > first + 0.25, rewards
