"""`RoutingCapture`: record the experts each MoE layer picked, or replay given ones (routing replay)."""

from __future__ import annotations

import torch


class RoutingCapture:
    """Passed to ``CausalLM.forward``; MoE layers call ``record(layer_idx, topk_ids[T, k])``.

    ``replay`` (optional) maps layer_idx -> topk_ids[T, k]: those layers route to the given experts instead
    of their own top-k (the gate weights are recomputed from the current router probabilities).
    """

    def __init__(self, replay: dict[int, torch.Tensor] | None = None):
        self.ids: dict[int, torch.Tensor] = {}
        self.replay = replay or {}

    def record(self, layer_idx: int, topk_ids: torch.Tensor) -> None:
        self.ids[layer_idx] = topk_ids.detach()

    def replay_ids(self, layer_idx: int) -> torch.Tensor | None:
        return self.replay.get(layer_idx)

    @property
    def layers(self) -> list[int]:
        return sorted(self.ids)

    def stacked(self) -> torch.Tensor:
        """Recorded ids as one tensor [T, n_moe_layers, k] in layer order (the engine's per-token layout)."""
        if not self.ids:
            raise ValueError("RoutingCapture.stacked: nothing was recorded (dense model or no forward yet)")
        return torch.stack([self.ids[i] for i in self.layers], dim=1)

    @classmethod
    def from_stacked(cls, ids: torch.Tensor, layers: list[int]) -> RoutingCapture:
        """Replay capture from ``stacked()`` output [T, len(layers), k]."""
        if ids.dim() != 3 or ids.shape[1] != len(layers):
            raise ValueError(f"RoutingCapture.from_stacked: expected [T, {len(layers)}, k], got {list(ids.shape)}")
        return cls(replay={layer: ids[:, i] for i, layer in enumerate(layers)})
