"""FSDP2 wrapping of the unified model: device mesh, per-layer + root `fully_shard`, mixed precision,
activation checkpointing, CPU offload.

`PolicyModel` puts the chunked log-prob head *inside* the root module's forward, so FSDP2 gathers
`lm_head` (and a tied embedding) for exactly the duration of forward/backward.
"""

from __future__ import annotations

import os

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from miles.models import CausalLM, VarlenAttention, token_logprobs


class PolicyModel(nn.Module):
    """CausalLM + log-probs of the targets at selected positions, in one forward."""

    def __init__(self, lm: CausalLM):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, positions: Tensor, cu_seqlens: Tensor, pred_index: Tensor, targets: Tensor,
                temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False,
                return_logits: bool = False):
        """-> (logp[N], entropy[N] | None) of targets predicted at hidden[pred_index]; or logits[T, V] / T (fp32)."""
        hidden = self.lm(input_ids, positions, VarlenAttention(cu_seqlens))
        if return_logits:
            return self.lm.compute_logits(hidden).float() / temperature
        return token_logprobs(hidden[pred_index], self.lm.lm_head_weight, targets, temperature=temperature,
                              chunk_size=chunk_size, with_entropy=with_entropy)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda:<LOCAL_RANK> when CUDA is available, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but CUDA is not available")
        local = int(os.environ.get("LOCAL_RANK", torch.distributed.get_rank() % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def make_mesh(device: torch.device) -> DeviceMesh:
    """1-D data-parallel mesh over all ranks of the default process group."""
    return init_device_mesh(device.type, (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))


def enable_activation_checkpointing(model: PolicyModel) -> None:
    """Recompute every decoder layer in backward (non-reentrant checkpoint); names stay unchanged."""
    for layer in model.lm.model.layers:
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def compile_layers(model: PolicyModel) -> None:
    """torch.compile each decoder layer in place (parameter names unchanged); attention is a graph break."""
    for layer in model.lm.model.layers:
        layer.compile(dynamic=True)


def shard_model(model: PolicyModel, mesh: DeviceMesh, *, bf16: bool, cpu_offload: bool) -> None:
    """fully_shard each decoder layer, then the root (embeddings, final norm, lm_head).

    bf16: params all-gathered and computed in bf16, gradients reduce-scattered in fp32, fp32 master shards.
    cpu_offload: shards, gradients and the optimizer step live on CPU (FSDP2 CPUOffloadPolicy).
    """
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    kwargs = {"mesh": mesh, "mp_policy": mp}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in model.lm.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
