"""Config groups owned by the RL loop: cluster placement, loop cadence, logging, checkpoints, debug.

Flag names follow slime (see docs/reference); flags shared with other groups (batch sizes, eval cadence)
are declared here too, and the first group that declares a name owns it in `--help`.

CPU-only machines: every "GPU" count below means one CPU process slot. `--actor-num-gpus-per-node 2`
places two trainer processes (gloo), `--rollout-num-gpus 2 --rollout-num-gpus-per-engine 1` two engine
processes, each in a Ray placement-group bundle of one CPU (`--colocate` shares the trainer's bundles).
"""

from __future__ import annotations

from dataclasses import dataclass

from miles.config import flag


@dataclass
class ClusterConfig:
    actor_num_nodes: int = flag(1, "nodes for the trainer")
    actor_num_gpus_per_node: int = flag(
        1, "trainer ranks per node, one device each (on CPU: one CPU process slot each; slime's default is 8)"
    )
    rollout_num_gpus: int | None = flag(
        None, "devices for rollout engines (default: the trainer's with --colocate, else 1); 0 = no local engines"
    )
    rollout_num_gpus_per_engine: int = flag(1, "devices per engine (its tensor-parallel size)")
    num_gpus_per_node: int = flag(8, "devices per node (accepted for slime compatibility; Ray packs the bundles)")
    colocate: bool = flag(False, "trainer and engines share devices; engines sleep while training, trainer offloads")
    offload_train: bool | None = flag(None, "offload trainer state during rollout (default: on with --colocate)")
    offload_rollout: bool | None = flag(None, "release engine memory during training (default: on with --colocate)")
    async_train: bool = flag(
        False,
        "one-step-off asynchronous loop: generate step k+1 while training step k (disaggregated only)",
        flags=("--async",),
    )
    update_weights_interval: int = flag(1, "sync weights to the engines every N rollouts")
    update_weight_buffer_size: int = flag(512 * 1024**2, "bytes per weight-sync bucket")
    update_weight_transport: str = flag(
        "auto",
        "weight-sync carrier: ipc (Ray object store, colocated), collective (torch.distributed broadcast: "
        "gloo on CPU, NCCL on GPU), disk (HF export + /update_weights_from_disk); auto = ipc if colocated "
        "else collective",
        choices=("auto", "ipc", "collective", "disk"),
    )
    update_weight_disk_dir: str | None = flag(None, "directory for --update-weight-transport disk (default: run dir)")
    rollout_external_engine_addrs: list[str] | None = flag(
        None, "use running `miles serve`/SGLang servers (host:port) instead of launching engines (disk sync only)"
    )
    sglang_router_ip: str | None = flag(None, "router address (filled in when Miles launches the router)")
    sglang_router_port: int | None = flag(None, "router port (filled in when Miles launches the router)")
    sglang_server_concurrency: int = flag(512, "max in-flight generate calls per engine")
    device: str = flag("auto", "device for trainer and engines", choices=("auto", "cpu", "cuda"))
    engine_max_num_seqs: int = flag(256, "max concurrent sequences per engine batch")
    engine_max_model_len: int | None = flag(None, "engine context length (default: the model's)")
    engine_kv_cache_tokens: int | None = flag(None, "engine KV-cache capacity in tokens on CPU (default: engine's)")
    engine_kv_memory_fraction: float | None = flag(
        None, "fraction of free GPU memory for the engine's KV cache (default: engine's; lower it with --colocate)"
    )
    ray_num_cpus: int | None = flag(None, "CPUs of a locally started Ray (default: all); ignored with RAY_ADDRESS")
    phase_timeout: float = flag(
        3600.0, "seconds any remote phase (rollout, train, sync, save) may take before stacks are dumped and it fails"
    )
    engine_startup_timeout: float = flag(600.0, "seconds to wait for engines and the router to become healthy")


@dataclass
class LoopConfig:
    num_rollout: int | None = flag(None, "number of rollout steps")
    num_epoch: int | None = flag(None, "if --num-rollout is unset: epochs over --prompt-data")
    start_rollout_id: int | None = flag(None, "first step (default: from the checkpoint when resuming, else 0)")
    rollout_batch_size: int | None = flag(None, "prompts (groups) per rollout step (required)")
    n_samples_per_prompt: int = flag(1, "responses per prompt (group size)")
    over_sampling_batch_size: int | None = flag(None, "prompt groups fetched per sampling round (>= rollout batch)")
    global_batch_size: int | None = flag(None, "samples per optimizer step")
    num_steps_per_rollout: int | None = flag(None, "optimizer steps per rollout (sets --global-batch-size)")
    eval_interval: int | None = flag(None, "evaluate before step 0 and after every N steps")
    eval_prompt_data: list[str] | None = flag(None, "NAME PATH [NAME PATH ...] held-out datasets")
    skip_eval_before_train: bool = flag(False, "do not evaluate before the first step")
    partial_rollout: bool = flag(False, "return aborted partial groups to the buffer to be continued")
    seed: int = flag(1234, "training seed")
    custom_reward_post_process_path: str | None = flag(
        None,
        "slime hook `fn(args, samples) -> (raw_rewards, rewards)` replacing group normalization; `rewards` "
        "become the per-token advantages (grpo/gspo)",
    )


@dataclass
class LoggingConfig:
    run_dir: str | None = flag(None, "run directory for metrics.jsonl, plots and dumps (default: runs/<time>)")
    use_tensorboard: bool = flag(False, "also log metrics to tensorboard under <run dir>/tensorboard")
    tb_project_name: str | None = flag(None, "tensorboard project (subdirectory)")
    tb_experiment_name: str | None = flag(None, "tensorboard experiment (subdirectory)")
    use_wandb: bool = flag(False, "also log metrics to Weights & Biases (needs `pip install wandb`)")
    wandb_mode: str | None = flag(None, "W&B mode", choices=("online", "offline", "disabled"))
    wandb_project: str | None = flag(None, "W&B project")
    wandb_group: str | None = flag(None, "W&B group")
    wandb_team: str | None = flag(None, "W&B entity")
    wandb_dir: str | None = flag(None, "W&B directory")
    wandb_run_id: str | None = flag(None, "W&B run id (resume)")
    log_passrate: bool = flag(False, "log pass@k of eval datasets")
    no_progress: bool = flag(False, "no progress bars (plain log lines)")
    custom_rollout_log_function_path: str | None = flag(
        None, "slime hook `fn(rollout_id, args, samples, extra_metrics, rollout_time) -> bool` (True: skip default)"
    )
    custom_eval_rollout_log_function_path: str | None = flag(
        None, "slime hook `fn(rollout_id, args, data, extra_metrics) -> bool` (True: skip default eval metrics)"
    )


@dataclass
class CheckpointConfig:
    hf_checkpoint: str | None = flag(None, "HF model directory: the starting policy, tokenizer and engine model")
    save: str | None = flag(None, "checkpoint directory (trainer state, data cursor, buffer, RNG, step)")
    save_interval: int | None = flag(None, "save after every N steps (and after the last one)")
    load: str | None = flag(None, "checkpoint directory to resume from (its latest step)")
    save_hf: str | None = flag(None, "HF export path template, formatted with {rollout_id}, written at each save")
    ref_load: str | None = flag(None, "reference model (HF dir) for KL; default: --hf-checkpoint")
    no_save_optim: bool = flag(False, "do not save optimizer state")


@dataclass
class DebugConfig:
    save_debug_rollout_data: str | None = flag(
        None, "torch.save each step's samples to this path template ({rollout_id}); eval dumps use eval_<id>"
    )
    load_debug_rollout_data: str | None = flag(
        None, "train on recorded samples from this path template instead of generating (no engines)"
    )
    load_debug_rollout_data_subsample: float | None = flag(None, "keep this fraction of the loaded samples")
    debug_rollout_only: bool = flag(False, "rollout only: no trainer, no training")
    debug_train_only: bool = flag(False, "train only: no engines; needs --load-debug-rollout-data")
    check_weight_update_equal: bool = flag(False, "after every sync, check engine weights equal the trainer's")
