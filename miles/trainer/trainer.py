"""`Trainer`: one FSDP2 rank of the policy trainer (log-probs, advantages, losses, AdamW steps).

Create one per rank inside an initialised process group (gloo on CPU, NCCL on GPU), then call
`train(batch)` with the *same* whole rollout batch on every rank (see batch.py). Memory per rank for a
model of P parameters over N ranks: fp32 master params 4P/N + AdamW state 8P/N + fp32 grads 4P/N; the
frozen reference copy (only with KL) adds 2P/N (bf16 shard on GPU, fp32 4P/N on CPU), or 0 device
memory with --ref-cpu-offload (its shards stay in host memory and are copied in per layer).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from miles.models import load_model
from miles.trainer.advantages import scalar_rewards, token_advantages
from miles.trainer.batch import TrainSample, validate_batch
from miles.trainer.config import AlgoConfig, TrainerConfig
from miles.trainer.fsdp import (
    PolicyModel,
    compile_layers,
    enable_activation_checkpointing,
    make_mesh,
    resolve_device,
    shard_model,
)
from miles.trainer.losses import LossInputs, compute_loss, load_function, loss_weights
from miles.trainer.packing import pack, rank_micro_batches, rank_partition, split_steps
from miles.trainer.schedule import build_scheduler

# metrics weighted like the loss (summed over micro-batches and ranks) / masked token sums (divided by #tokens)
REDUCED_KEYS = ("loss", "pg_loss", "sft_loss", "kl_loss", "entropy_loss")
TOKEN_KEYS = ("pg_clipfrac", "pg_clipfrac_dual", "ppo_kl", "tis", "tis_clipfrac", "tis_abs",
              "train_rollout_logprob_abs_diff", "entropy")
_DUMMY = TrainSample(tokens=[0, 0], response_length=1, loss_mask=[0], reward=0.0, group_index=-1)


class Trainer:
    """Per-rank FSDP2 policy trainer; see module docstring."""

    def __init__(self, model_path: str | Path, algo: AlgoConfig | None = None, cfg: TrainerConfig | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("Trainer needs an initialised torch.distributed process group "
                               "(dist.init_process_group('gloo') on CPU, 'nccl' on GPU)")
        self.algo = algo or AlgoConfig()
        self.cfg = cfg or TrainerConfig()
        self.algo.validate()
        self.cfg.validate()
        self.model_path = Path(model_path)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = resolve_device(self.cfg.device)
        self.bf16 = self.device.type == "cuda" and self.cfg.bf16
        torch.manual_seed(self.cfg.seed)
        self.mesh = make_mesh(self.device)

        lm = load_model(self.model_path, dtype=torch.float32, device="cpu")
        self.model_config = lm.config
        self.model = PolicyModel(lm)
        if self.cfg.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        if self.cfg.compile:
            compile_layers(self.model)
        if self.cfg.optimizer_cpu_offload and self.device.type != "cuda":
            raise ValueError("--optimizer-cpu-offload needs --device cuda")
        shard_model(self.model, self.mesh, bf16=self.bf16, cpu_offload=self.cfg.optimizer_cpu_offload)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.cfg.lr, betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
            eps=self.cfg.adam_eps, weight_decay=self.cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, self.cfg)
        self.ref = self._build_ref() if self.algo.needs_ref else None
        self.step = 0  # optimizer steps taken
        self.skipped_steps = 0  # steps skipped for a non-finite grad norm
        self.offloaded = False
        self.fast_on_policy = True  # see train(): skip the pi_old forward when it equals the training forward
        self.loss_fn = load_function(self.algo.custom_loss_function_path) \
            if self.algo.loss_type == "custom_loss" else None
        self.reducer_factory = load_function(self.algo.custom_pg_loss_reducer_function_path) \
            if self.algo.custom_pg_loss_reducer_function_path else None
        self.args = argparse.Namespace(**dataclasses.asdict(self.cfg), **dataclasses.asdict(self.algo))

    def _build_ref(self) -> PolicyModel:
        """Frozen copy of the initial weights, sharded like the policy (bf16 on GPU)."""
        lm = load_model(self.model_path, dtype=torch.bfloat16 if self.bf16 else torch.float32, device="cpu")
        ref = PolicyModel(lm).requires_grad_(False)
        shard_model(ref, self.mesh, bf16=False, cpu_offload=self.cfg.ref_cpu_offload and self.device.type == "cuda")
        return ref

    # ------------------------------------------------------------------ forward helpers

    def _forward(self, model: PolicyModel, samples: Sequence[TrainSample], with_entropy: bool,
                 return_logits: bool = False):
        packed = pack([s.tokens for s in samples], [s.response_length for s in samples]).to(self.device)
        out = model(packed.input_ids, packed.positions, packed.cu_seqlens, packed.pred_index, packed.targets,
                    temperature=self.cfg.rollout_temperature, chunk_size=self.cfg.log_probs_chunk_size,
                    with_entropy=with_entropy, return_logits=return_logits)
        return out, packed

    def _logprob_pass(self, samples: list[TrainSample], micro_batches: list[list[int]], need_old: bool,
                      need_ref: bool) -> dict[int, dict[str, Tensor]]:
        """Per-sample (CPU fp32) old log-probs + entropy and reference log-probs at response positions.

        With --compile-model the policy forward runs in grad mode (graph dropped at once) so it executes the
        very compiled graph the training forward uses: pi_old then equals pi bit for bit at a rollout's first step.
        """
        out: dict[int, dict[str, Tensor]] = defaultdict(dict)
        for mb in micro_batches:
            batch = [samples[i] for i in mb] or [_DUMMY]
            for name, model, ent in (("old", self.model, True), ("ref", self.ref, False)):
                if (name == "old" and not need_old) or (name == "ref" and not need_ref):
                    continue
                with torch.set_grad_enabled(name == "old" and self.cfg.compile):
                    (logp, entropy), _ = self._forward(model, batch, with_entropy=ent)
                logp, entropy = logp.detach(), None if entropy is None else entropy.detach()
                for i, piece in zip(mb, logp.float().cpu().split([s.response_length for s in batch])):
                    out[i][name] = piece
                if ent:
                    for i, piece in zip(mb, entropy.float().cpu().split([s.response_length for s in batch])):
                        out[i]["entropy"] = piece
        return out

    # ------------------------------------------------------------------ training

    def train(self, batch: Sequence) -> dict[str, float]:
        """One rollout's training: log-prob pass, advantages, `num_steps_per_rollout` optimizer steps.

        `batch` is the whole rollout batch (identical on every rank). Returns metrics averaged over the
        optimizer steps (loss terms as global-batch values, token statistics as global token means).
        """
        if self.offloaded:
            raise RuntimeError("Trainer.train called while offloaded; call onload() first")
        algo, cfg = self.algo, self.cfg
        need_rollout = algo.use_tis or algo.use_rollout_logprobs
        samples = validate_batch(batch, self.model_config.vocab_size, cfg.n_samples_per_prompt,
                                 need_reward=algo.loss_type != "sft_loss", need_rollout_logprobs=need_rollout)
        lengths = [len(s.tokens) for s in samples]
        steps = split_steps(len(samples), cfg.step_batch_size(len(samples)))
        budget = cfg.max_tokens_per_gpu if cfg.use_dynamic_batch_size else None
        lp_budget = (cfg.log_probs_max_tokens_per_gpu or budget) if cfg.use_dynamic_batch_size else None
        parts = [rank_partition(st, lengths, self.world_size, equal_count=budget is None) for st in steps]
        train_plan = [rank_micro_batches(p, lengths, cfg.micro_batch_size, budget)[self.rank] for p in parts]
        lp_plan = train_plan if lp_budget == budget else \
            [rank_micro_batches(p, lengths, cfg.micro_batch_size, lp_budget)[self.rank] for p in parts]
        mine = sorted(i for p in parts for i in p[self.rank])

        # pi_old / reference log-probs (weights at the start of this rollout)
        need_ref = self.ref is not None and not all(s.ref_log_probs is not None for s in samples)
        # On-policy fast path: with one optimizer step per rollout pi_old == pi_theta, so the training forward's
        # detached log-probs serve as pi_old (ratio exactly 1) and the separate log-prob forward is skipped.
        # The old pass is still needed when advantages use the KL (kl_coef) or there are several steps.
        on_policy = self.fast_on_policy and len(steps) == 1 and algo.kl_coef == 0 and self.loss_fn is None
        need_old = not on_policy and not algo.use_rollout_logprobs  # (entropy then comes from the training forward)
        lp = self._logprob_pass(samples, [mb for step in lp_plan for mb in step], need_old, need_ref)
        data: dict[int, dict[str, Tensor]] = {}
        for i in mine:
            s, d = samples[i], lp[i]
            d["mask"] = s.mask_tensor()
            if algo.use_rollout_logprobs:
                d["old"] = torch.tensor(s.rollout_log_probs, dtype=torch.float32)
            if s.rollout_log_probs is not None:
                d["rollout"] = torch.tensor(s.rollout_log_probs, dtype=torch.float32)
            if s.ref_log_probs is not None:
                d["ref"] = torch.tensor(s.ref_log_probs, dtype=torch.float32)
            data[i] = d

        # advantages: group statistics over all samples, per-token terms for this rank's samples
        if algo.loss_type != "sft_loss":
            if samples[0].advantages is not None:
                for i in mine:
                    data[i]["adv"] = torch.tensor(samples[i].advantages, dtype=torch.float32) * data[i]["mask"]
            else:
                scalars = scalar_rewards(algo, [s.reward for s in samples], [s.group_index for s in samples])
                has_kl = all("ref" in data[i] and "old" in data[i] for i in mine)
                kl = [data[i]["old"] - data[i]["ref"] for i in mine] if has_kl else None
                advs = token_advantages(algo, scalars[mine], [data[i]["mask"] for i in mine], kl,
                                        all_reduce=self._all_reduce_sum)
                for i, a in zip(mine, advs):
                    data[i]["adv"] = a

        per_step = [self._train_step(samples, data, step, plan) for step, plan in zip(steps, train_plan)]
        keys = dict.fromkeys(k for m in per_step for k in m)
        metrics = {k: sum(vals) / len(vals) for k in keys if (vals := [m[k] for m in per_step if k in m])}
        metrics.update(step=float(self.step), skipped_steps=float(self.skipped_steps),
                       num_optimizer_steps=float(len(per_step)))
        return metrics

    def _train_step(self, samples: list[TrainSample], data: dict[int, dict[str, Tensor]], step: list[int],
                    plan: list[list[int]]) -> dict[str, float]:
        algo = self.algo
        n_samples = len(step)
        n_tokens = int(sum(samples[i].mask_tensor().sum() for i in step))
        # accumulated on the device: no host sync per micro-batch
        reduced = torch.zeros(len(REDUCED_KEYS), dtype=torch.float64, device=self.device)
        sums = torch.zeros(len(TOKEN_KEYS), dtype=torch.float64, device=self.device)
        present = torch.zeros(len(REDUCED_KEYS) + len(TOKEN_KEYS), dtype=torch.float64)
        ratio_ext = torch.full((2,), -math.inf, dtype=torch.float64, device=self.device)  # max ratio, -min ratio
        has_rollout = all(s.rollout_log_probs is not None for s in samples)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        for mb in plan:
            batch = [samples[i] for i in mb] or [_DUMMY]
            rows = [data[i] for i in mb] or [_dummy_row(has_rollout, self.ref is not None)]
            masks = [r["mask"] for r in rows]
            weights = loss_weights(masks, algo.loss_reduction, n_samples, n_tokens, algo.loss_reduction_constant)
            cat = _concat(rows, self.device)
            weight, mask = torch.cat(weights).to(self.device), cat("mask")
            if self.loss_fn is not None:
                loss, red, tok = self._custom_loss(batch, rows, weight)
            else:
                with_ent = algo.entropy_coef != 0 or not any("entropy" in r for r in rows)
                (logp, entropy), packed = self._forward(self.model, batch, with_entropy=with_ent)
                old = cat("old")
                reducer = self._pg_reducer(batch, masks, n_samples) if self.reducer_factory else None
                x = LossInputs(logp=logp, old_logp=old if old is not None else logp.detach(),
                               advantages=cat("adv") if "adv" in rows[0] else torch.zeros_like(logp),
                               mask=mask, weight=weight, segments=packed.segments, n_seq=len(batch),
                               rollout_logp=cat("rollout"), ref_logp=cat("ref"),
                               entropy=entropy if algo.entropy_coef != 0 else None,
                               pg_reducer=reducer)
                loss, red, tok = compute_loss(algo, x)
                if algo.loss_type == "policy_loss":
                    log_ratio = logp.detach() - x.old_logp
                    hi = torch.where(mask > 0, log_ratio, -math.inf).max().exp()
                    lo = torch.where(mask > 0, log_ratio, math.inf).min().exp()
                    ratio_ext = torch.maximum(ratio_ext, torch.stack([hi, -lo]).double())
            if "entropy" in rows[0] and all("entropy" in r for r in rows):
                tok["entropy"] = (torch.cat([r["entropy"] for r in rows]) * torch.cat(masks)).sum().to(self.device)
            elif self.loss_fn is None and entropy is not None:
                tok["entropy"] = (entropy.detach() * mask).sum()
            (loss * self.world_size).backward()  # FSDP averages gradients over ranks; we want the sum
            for j, k in enumerate(REDUCED_KEYS):
                if k in red:
                    reduced[j] += red[k].detach().double()
                    present[j] = 1
            for j, k in enumerate(TOKEN_KEYS):
                if k in tok:
                    sums[j] += tok[k].detach().double()
                    present[len(REDUCED_KEYS) + j] = 1

        grad_norm = self._clip_and_step()
        stats = torch.cat([reduced.cpu(), sums.cpu(), present])
        ratio_ext = ratio_ext.cpu()
        self._all_reduce_sum(stats)
        self._all_reduce_sum(ratio_ext, op=dist.ReduceOp.MAX)
        reduced, sums, present = stats.split([len(REDUCED_KEYS), len(TOKEN_KEYS), len(present)])
        out = {k: float(reduced[j]) for j, k in enumerate(REDUCED_KEYS) if present[j] > 0}
        out.update({k: float(sums[j]) / max(n_tokens, 1) for j, k in enumerate(TOKEN_KEYS)
                    if present[len(REDUCED_KEYS) + j] > 0})
        if ratio_ext[0] > 0:
            out.update(ratio_max=float(ratio_ext[0]), ratio_min=float(-ratio_ext[1]))
        out.update(grad_norm=grad_norm, lr=self.optimizer.param_groups[0]["lr"], train_tokens=float(n_tokens))
        return out

    def _pg_reducer(self, batch: list[TrainSample], masks: list[Tensor], n_samples: int) -> Callable:
        fn = self.reducer_factory([len(s.tokens) for s in batch], [s.response_length for s in batch],
                                  [m.to(self.device) for m in masks], self.algo.loss_reduction == "token_mean")
        return lambda x: fn(x) / n_samples

    def _custom_loss(self, batch: list[TrainSample], rows: list[dict[str, Tensor]], weight: Tensor):
        """slime's custom loss: fn(args, batch, logits[1, T, V], sum_of_sample_mean) -> (loss, metrics)."""
        logits, _ = self._forward(self.model, batch, with_entropy=False, return_logits=True)
        dev = self.device

        def get(key: str) -> list[Tensor] | None:
            return [r[key].to(dev) for r in rows] if all(key in r for r in rows) else None

        data = {
            "unconcat_tokens": [torch.as_tensor(s.tokens, device=dev) for s in batch],
            "response_lengths": [s.response_length for s in batch],
            "total_lengths": [len(s.tokens) for s in batch],
            "loss_masks": get("mask"), "advantages": get("adv"), "returns": get("adv"),
            "log_probs": get("old"), "ref_log_probs": get("ref"), "rollout_log_probs": get("rollout"),
            "rewards": [s.reward for s in batch],
        }
        loss, metrics = self.loss_fn(self.args, data, logits.unsqueeze(0), lambda x: (x.float() * weight).sum())
        red = {"loss": loss.detach()}
        red.update({k: v.detach() for k, v in (metrics or {}).items() if k in REDUCED_KEYS and k != "loss"})
        return loss, red, {}

    def _clip_and_step(self) -> float:
        """Global grad norm (fp32), clip, and step -- or skip (and count) when the norm is NaN/Inf."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, error_if_nonfinite=False)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        norm_f = float(norm)
        if not math.isfinite(norm_f):
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            return norm_f
        if self.cfg.clip_grad > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.clip_grad, norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return norm_f

    def _all_reduce_sum(self, t: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
        """In-place all-reduce over ranks of a CPU tensor (moved through the device for NCCL)."""
        if self.world_size == 1:
            return
        if self.device.type == "cuda":
            d = t.to(self.device)
            dist.all_reduce(d, op=op)
            t.copy_(d.cpu())
        else:
            dist.all_reduce(t, op=op)

    @torch.no_grad()
    def update_ref(self) -> None:
        """Copy the current policy weights into the reference model (--ref-update-interval); local shards only."""
        if self.ref is None:
            raise RuntimeError("update_ref: no reference model (KL is off: --use-kl-loss/--kl-coef)")
        for (name, p), (ref_name, r) in zip(self.model.named_parameters(), self.ref.named_parameters()):
            assert name == ref_name, (name, ref_name)
            src, dst = (t.to_local() if isinstance(t, DTensor) else t for t in (p, r))
            dst.copy_(src)

    # ------------------------------------------------------------------ state, export, weight sync

    def save(self, directory: str | Path) -> Path:
        """Atomic DCP checkpoint of model, optimizer, scheduler, RNG and step under `directory` (collective)."""
        from miles.trainer.checkpoint import save_checkpoint
        return save_checkpoint(self, directory)

    def load(self, directory: str | Path) -> int:
        """Resume from `directory` (its `latest` pointer or a step dir); returns the restored step (collective)."""
        from miles.trainer.checkpoint import load_checkpoint
        return load_checkpoint(self, directory)

    def export_hf(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Full HF safetensors + config + tokenizer in `directory` (collective; rank 0 writes)."""
        from miles.trainer.weights import export_hf
        return export_hf(self, directory, dtype)

    def iter_weight_buckets(self, bucket_bytes: int, dtype: torch.dtype | None = None
                            ) -> Iterator[list[tuple[str, Tensor]]]:
        """Buckets of (hf_name, full tensor) of about bucket_bytes (collective: every rank must iterate)."""
        from miles.trainer.weights import iter_weight_buckets
        return iter_weight_buckets(self, bucket_bytes, dtype)

    def offload(self) -> None:
        """Move parameters and optimizer state to CPU (colocated rollout); no-op on CPU."""
        from miles.trainer.weights import offload
        offload(self)

    def onload(self) -> None:
        """Bring parameters and optimizer state back to the device after `offload`."""
        from miles.trainer.weights import onload
        onload(self)


def _concat(rows: list[dict[str, Tensor]], device: torch.device) -> Callable[[str], Tensor | None]:
    """key -> the rows' tensors concatenated on `device`, or None when some row lacks the key."""
    def cat(key: str) -> Tensor | None:
        return torch.cat([r[key] for r in rows]).to(device) if all(key in r for r in rows) else None
    return cat


def _dummy_row(has_rollout: bool, has_ref: bool) -> dict[str, Tensor]:
    """Loss inputs of the padding micro-batch (weight 0: it only keeps FSDP collectives matched)."""
    z = torch.zeros(1)
    row = {"mask": z.clone(), "old": z.clone(), "adv": z.clone()}
    if has_rollout:
        row["rollout"] = z.clone()
    if has_ref:
        row["ref"] = z.clone()
    return row
