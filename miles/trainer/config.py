"""Typed trainer flags (snake_case of slime's names); `miles train` turns these dataclasses into CLI groups.

Field metadata: `help` (always), `choices` (closed sets), `flag` (CLI spelling when it is not
`--<field-name>`, e.g. slime's inverted `--disable-grpo-std-normalization` -> `grpo_std_normalization`,
with `action="store_false"`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ADVANTAGE_ESTIMATORS = ("grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
LOSS_TYPES = ("policy_loss", "sft_loss", "custom_loss")
KL_TYPES = ("k1", "k2", "k3", "low_var_kl")
LOSS_REDUCTIONS = ("sequence_mean", "token_mean", "constant")
LR_DECAY_STYLES = ("constant", "cosine")


def _f(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


class ConfigError(ValueError):
    """A flag combination that cannot work; the message names the flags."""


@dataclass
class AlgoConfig:
    """Advantage estimator, policy loss, KL / entropy / TIS terms and loss aggregation."""

    advantage_estimator: str = _f("grpo", "How rewards become per-token advantages.", choices=ADVANTAGE_ESTIMATORS)
    loss_type: str = _f("policy_loss", "Training loss (custom_loss needs --custom-loss-function-path).",
                        choices=LOSS_TYPES)
    custom_loss_function_path: str | None = _f(
        None, "Dotted path of fn(args, batch, logits, sum_of_sample_mean) -> (loss, metrics) (slime signature).")
    custom_pg_loss_reducer_function_path: str | None = _f(
        None, "Dotted path of get_reducer(total_lengths, response_lengths, loss_masks, calculate_per_token_loss) "
              "-> fn(per_token) -> scalar (sum of per-sample values; Miles divides by the global batch size).")
    eps_clip: float = _f(0.2, "PPO clip epsilon (lower side: 1 - eps).")
    eps_clip_high: float | None = _f(None, "Upper PPO clip (DAPO clip-higher); default = --eps-clip.")
    eps_clip_c: float | None = _f(None, "Dual-clip PPO constant c (> 1): loss of negative-advantage tokens <= c*|A|.")
    use_kl_loss: bool = _f(False, "Add kl_loss_coef * KL(policy || reference) to the loss.")
    kl_loss_coef: float = _f(0.0, "Weight of the KL loss term.")
    kl_loss_type: str = _f("k1", "KL estimator for the loss.", choices=KL_TYPES)
    kl_coef: float = _f(0.0, "KL penalty folded into token rewards (reinforce_plus_plus[_baseline]).")
    ref_update_interval: int | None = _f(None, "Copy the policy into the reference model every N rollouts "
                                         "(Trainer.update_ref; None = the reference stays the initial weights).")
    entropy_coef: float = _f(0.0, "Entropy bonus: loss -= coef * entropy.")
    use_tis: bool = _f(False, "Truncated importance sampling with the rollout log-probs.")
    tis_clip: float = _f(2.0, "Upper clamp of the TIS weight pi_old/pi_rollout.")
    tis_clip_low: float = _f(0.0, "Lower clamp of the TIS weight.")
    use_rollout_logprobs: bool = _f(False, "Use the rollout engine's log-probs as pi_old (skip the recompute).")
    normalize_advantages: bool = _f(False, "Masked whitening of advantages over the whole rollout batch.")
    grpo_std_normalization: bool = _f(True, "Divide GRPO group-centred rewards by the group std (off = Dr.GRPO).",
                                      flag="--disable-grpo-std-normalization", action="store_false")
    rewards_normalization: bool = _f(True, "Group-normalise rewards at all (grpo/gspo/baseline).",
                                     flag="--disable-rewards-normalization", action="store_false")
    calculate_per_token_loss: bool = _f(False, "Token mean over the global batch (= --loss-reduction token_mean).")
    loss_reduction: str = _f("sequence_mean", "Loss aggregation: per-sequence token mean averaged over samples, "
                             "token mean over the global batch, or Dr.GRPO's sum / (constant * samples).",
                             choices=LOSS_REDUCTIONS)
    loss_reduction_constant: int | None = _f(None, "Dr.GRPO normaliser (tokens per sample) for "
                                             "--loss-reduction constant, e.g. the max response length.")
    gamma: float = _f(1.0, "Discount for reinforce_plus_plus token returns.")

    def __post_init__(self) -> None:
        if self.eps_clip_high is None:
            self.eps_clip_high = self.eps_clip
        if self.calculate_per_token_loss:
            if self.loss_reduction not in ("sequence_mean", "token_mean"):
                raise ConfigError("--calculate-per-token-loss conflicts with --loss-reduction "
                                  f"{self.loss_reduction}")
            self.loss_reduction = "token_mean"

    def validate(self) -> None:
        """Raise ConfigError naming the offending flags."""
        _choice("--advantage-estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        _choice("--loss-type", self.loss_type, LOSS_TYPES)
        _choice("--kl-loss-type", self.kl_loss_type, KL_TYPES)
        _choice("--loss-reduction", self.loss_reduction, LOSS_REDUCTIONS)
        if self.loss_type == "custom_loss" and not self.custom_loss_function_path:
            raise ConfigError("--loss-type custom_loss requires --custom-loss-function-path")
        if self.eps_clip < 0 or self.eps_clip_high < 0:
            raise ConfigError("--eps-clip / --eps-clip-high must be >= 0")
        if self.eps_clip_c is not None and self.eps_clip_c <= 1.0:
            raise ConfigError(f"--eps-clip-c must be > 1 (dual-clip lower bound), got {self.eps_clip_c}")
        if self.kl_coef != 0 and self.kl_loss_coef != 0:
            raise ConfigError("--kl-coef and --kl-loss-coef may not both be non-zero")
        if self.kl_loss_coef != 0 and not self.use_kl_loss:
            raise ConfigError("--kl-loss-coef is set but --use-kl-loss is off")
        if self.use_tis and self.use_rollout_logprobs:
            raise ConfigError("--use-tis is meaningless with --use-rollout-logprobs (the weights would all be 1)")
        if self.tis_clip_low > self.tis_clip:
            raise ConfigError("--tis-clip-low must be <= --tis-clip")
        if self.loss_reduction == "constant" and not self.loss_reduction_constant:
            raise ConfigError("--loss-reduction constant requires --loss-reduction-constant")
        if self.ref_update_interval is not None and self.ref_update_interval < 1:
            raise ConfigError(f"--ref-update-interval must be >= 1, got {self.ref_update_interval}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"--gamma must be in [0, 1], got {self.gamma}")

    @property
    def needs_ref(self) -> bool:
        """Whether reference log-probs are needed (KL loss or KL-in-reward)."""
        return (self.use_kl_loss and self.kl_loss_coef != 0) or self.kl_coef != 0


@dataclass
class TrainerConfig:
    """Optimizer, schedule, batch split, memory and device options of the FSDP2 trainer."""

    lr: float = _f(1e-6, "AdamW learning rate (peak).")
    min_lr: float = _f(0.0, "Final learning rate of the cosine decay.")
    lr_warmup_iters: int = _f(0, "Linear warmup optimizer steps.")
    lr_decay_style: str = _f("constant", "LR schedule after warmup.", choices=LR_DECAY_STYLES)
    lr_decay_iters: int | None = _f(None, "Optimizer steps of the cosine decay (required for cosine).")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.98, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    clip_grad: float = _f(1.0, "Max global grad norm (0 = no clipping).")
    rollout_batch_size: int | None = _f(None, "Prompts per rollout (checked against the batch split).")
    n_samples_per_prompt: int = _f(1, "Responses per prompt.")
    global_batch_size: int | None = _f(None, "Samples per optimizer step (default: the whole rollout).")
    micro_batch_size: int = _f(1, "Samples per micro-batch (ignored with --use-dynamic-batch-size).")
    num_steps_per_rollout: int | None = _f(None, "Optimizer steps per rollout; sets global batch size.")
    use_dynamic_batch_size: bool = _f(False, "Pack micro-batches by token budget (--max-tokens-per-gpu).")
    max_tokens_per_gpu: int | None = _f(None, "Token budget of one packed micro-batch.")
    log_probs_max_tokens_per_gpu: int | None = _f(None, "Token budget of the no-grad log-prob forward.")
    log_probs_chunk_size: int = _f(1024, "Tokens per chunk of the fp32 log-softmax (memory bound).")
    rollout_temperature: float = _f(1.0, "Sampling temperature of the rollout: trainer log-probs are "
                                    "log_softmax(logits / T) (shared with the rollout group).")
    gradient_checkpointing: bool = _f(False, "Recompute decoder layers in backward (activation checkpointing).")
    compile: bool = _f(False, "torch.compile every decoder layer (fuses norms/RoPE/SwiGLU; first steps compile).",
                       flags=("--compile-model",))
    bf16: bool = _f(True, "bf16 compute with fp32 master weights and fp32 gradient reduction (GPU only).")
    optimizer_cpu_offload: bool = _f(False, "Keep parameter/gradient/optimizer-state shards on CPU (FSDP2 "
                                     "CPUOffloadPolicy; the AdamW step runs on CPU). GPU only.")
    ref_cpu_offload: bool = _f(False, "Keep the frozen reference shard on CPU and copy it in for each use.")
    seed: int = _f(1234, "Training seed.")
    device: str = _f("auto", "cpu | cuda | auto (cuda if available).", choices=("auto", "cpu", "cuda"))

    def validate(self) -> None:
        """Raise ConfigError naming the offending flags."""
        _choice("--lr-decay-style", self.lr_decay_style, LR_DECAY_STYLES)
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= --min-lr <= --lr and --lr > 0 (got lr={self.lr}, min_lr={self.min_lr})")
        if self.lr_decay_style == "cosine" and not self.lr_decay_iters:
            raise ConfigError("--lr-decay-style cosine requires --lr-decay-iters")
        if self.use_dynamic_batch_size and not self.max_tokens_per_gpu:
            raise ConfigError("--use-dynamic-batch-size requires --max-tokens-per-gpu")
        if self.micro_batch_size < 1:
            raise ConfigError("--micro-batch-size must be >= 1")
        if self.rollout_temperature <= 0:
            raise ConfigError("--rollout-temperature must be > 0")
        if self.rollout_batch_size is not None:
            total = self.rollout_batch_size * self.n_samples_per_prompt
            steps = self.num_steps_per_rollout
            if steps is not None:
                if total % steps:
                    raise ConfigError(f"--rollout-batch-size x --n-samples-per-prompt = {total} is not divisible "
                                      f"by --num-steps-per-rollout {steps}")
                if self.global_batch_size is not None and self.global_batch_size * steps != total:
                    raise ConfigError(f"--global-batch-size {self.global_batch_size} x --num-steps-per-rollout "
                                      f"{steps} != --rollout-batch-size x --n-samples-per-prompt = {total}")
            if self.global_batch_size is not None and total % self.global_batch_size:
                raise ConfigError(f"--rollout-batch-size x --n-samples-per-prompt = {total} is not divisible "
                                  f"by --global-batch-size {self.global_batch_size}")

    def step_batch_size(self, n_samples: int) -> int:
        """Samples per optimizer step for a rollout of n_samples (slime's derivation)."""
        if self.num_steps_per_rollout is not None:
            if n_samples % self.num_steps_per_rollout:
                raise ConfigError(f"{n_samples} samples are not divisible by --num-steps-per-rollout "
                                  f"{self.num_steps_per_rollout}")
            gbs = n_samples // self.num_steps_per_rollout
            if self.global_batch_size is not None and gbs != self.global_batch_size:
                raise ConfigError(f"--global-batch-size {self.global_batch_size} disagrees with {n_samples} samples / "
                                  f"--num-steps-per-rollout {self.num_steps_per_rollout}")
            return gbs
        gbs = self.global_batch_size or n_samples
        if n_samples % gbs:
            raise ConfigError(f"{n_samples} samples are not divisible by --global-batch-size {gbs}")
        return gbs


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{flag} {value!r} is not one of {', '.join(choices)}")
