"""Sparse MoE block = `Router` (which experts) + `Experts` (stacked weights, grouped matmuls).

Extension points (kept explicit so DeepSeek-V3-style models and expert parallelism slot in):
- `Router(score_func="sigmoid", use_bias=True, n_group=..., topk_group=..., routed_scaling_factor=...)`
  implements DeepSeek-V3 routing (sigmoid scores, ``e_score_correction_bias`` for selection only, grouped top-k).
- `SparseMoeBlock.shared_experts` (a dense MLP added to the routed output) for shared-expert variants.
- `Experts(expert_start, num_local_experts)` holds a contiguous slice of experts; assignments to experts
  outside the slice contribute zero (an EP dispatcher exchanges tokens around this module).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP
from .routing import RoutingCapture

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class Router(nn.Module):
    """Top-k router; ``forward(x[T, H]) -> (topk_ids[T, k] int64, topk_weights[T, k] in x.dtype)``."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool,
        score_func: str = "softmax",
        use_bias: bool = False,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
    ):
        super().__init__()
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"Router: unknown score_func {score_func!r}")
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.score_func, self.n_group, self.topk_group = score_func, n_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        if use_bias:  # DeepSeek-V3: added to scores for expert *selection* only
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)
        else:
            self.e_score_correction_bias = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Per-expert routing scores [T, E] in fp32."""
        logits = F.linear(x, self.weight)
        return logits.float().sigmoid() if self.score_func == "sigmoid" else torch.softmax(logits, -1, torch.float32)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k expert ids [T, k] from fp32 scores (with bias / group limits when configured)."""
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            t = choice.shape[0]
            groups = choice.view(t, self.n_group, -1).topk(2, dim=-1).values.sum(-1)  # [T, G]
            keep = torch.zeros_like(groups).scatter_(1, groups.topk(self.topk_group, dim=-1).indices, 1.0)
            mask = keep[:, :, None].expand(t, self.n_group, self.num_experts // self.n_group).reshape(t, -1)
            choice = choice.masked_fill(mask == 0, float("-inf"))
        return torch.topk(choice, self.top_k, dim=-1).indices

    def forward(self, x: torch.Tensor, replay_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.scores(x)
        ids = self.select(scores) if replay_ids is None else replay_ids.to(device=x.device, dtype=torch.long)
        w = scores.gather(1, ids)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + (1e-20 if self.score_func == "sigmoid" else 0.0))
        if self.routed_scaling_factor != 1.0:
            w = w * self.routed_scaling_factor
        return ids, w.to(x.dtype)


class Experts(nn.Module):
    """Stacked SwiGLU experts: ``gate_up_proj [E_local, 2I, H]`` (gate rows first), ``down_proj [E_local, H, I]``.

    Tokens are sorted by expert and run through two grouped matmuls (``torch._grouped_mm``) on CPU and on
    CUDA in bf16 -- no Python loop over experts, no host sync; otherwise one matmul per expert.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        expert_start: int = 0,
        num_local_experts: int | None = None,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.expert_start = expert_start
        self.num_local_experts = num_experts if num_local_experts is None else num_local_experts
        n = self.num_local_experts
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n, hidden_size, intermediate_size))
        self.use_grouped_mm: bool | None = None  # None: automatic
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)

    def _grouped(self, x: torch.Tensor) -> bool:
        if self.use_grouped_mm is not None:
            return self.use_grouped_mm
        if _GROUPED_MM is None:
            return False
        if x.is_cuda:
            return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
        return x.device.type == "cpu"

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_ids/topk_weights [T, k] -> sum_k w_k * expert_k(x) [T, H]."""
        t, k = topk_ids.shape
        n = self.num_local_experts
        local = topk_ids.reshape(-1) - self.expert_start
        partial = n != self.num_experts
        if partial:  # assignments to other ranks' experts sort to the tail and are skipped
            local = torch.where((local >= 0) & (local < n), local, n)
        local_sorted, order = torch.sort(local, stable=True)
        xs = x[order // k]
        if partial:
            off = (local_sorted == n)[:, None]
            xs = xs.masked_fill(off, 0.0)
        if self._grouped(x):
            hist_in = local_sorted.int() if x.is_cuda else local_sorted.float()
            offs = torch.cumsum(torch.histc(hist_in, bins=n, min=0, max=n - 1), 0, dtype=torch.int32)
            h = _GROUPED_MM(xs, self.gate_up_proj.transpose(1, 2), offs=offs)
            if partial:
                h = h.masked_fill(off, 0.0)
            gate, up = h.chunk(2, dim=-1)
            ys = _GROUPED_MM(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offs)
        else:
            counts = torch.bincount(local_sorted, minlength=n + 1)[:n].tolist()
            ys, start = xs.new_zeros(xs.shape), 0
            for e, c in enumerate(counts):
                if c:
                    gate, up = F.linear(xs[start : start + c], self.gate_up_proj[e]).chunk(2, dim=-1)
                    ys[start : start + c] = F.linear(F.silu(gate) * up, self.down_proj[e])
                start += c
        ys = ys * topk_weights.reshape(-1)[order, None].to(ys.dtype)
        if partial:
            ys = ys.masked_fill(off, 0.0)
        out = torch.empty_like(ys)
        out[order] = ys
        return out.view(t, k, -1).sum(1)


class SparseMoeBlock(nn.Module):
    """``mlp.gate`` (Router) + ``mlp.experts`` (Experts) [+ optional ``shared_experts``]; records routing."""

    def __init__(self, router: Router, experts: Experts, shared_experts: MLP | None = None):
        super().__init__()
        self.gate = router
        self.experts = experts
        self.shared_experts = shared_experts

    def forward(self, x: torch.Tensor, layer_idx: int, routing: RoutingCapture | None = None) -> torch.Tensor:
        replay = routing.replay_ids(layer_idx) if routing is not None else None
        ids, w = self.gate(x, replay)
        if routing is not None:
            routing.record(layer_idx, ids)
        out = self.experts(x, ids, w)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
