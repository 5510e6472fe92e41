"""THE name mapping between Miles parameters and HF checkpoint tensors.

Miles names equal HF names except stacked MoE experts:
``<p>.mlp.experts.gate_up_proj [E, 2I, H]`` <-> ``<p>.mlp.experts.{e}.gate_proj.weight [I, H]`` (rows ``:I``) and
``<p>.mlp.experts.{e}.up_proj.weight [I, H]`` (rows ``I:``); ``<p>.mlp.experts.down_proj [E, H, I]`` <->
``<p>.mlp.experts.{e}.down_proj.weight [H, I]``. On load the fused layout (``experts.gate_up_proj`` /
``experts.down_proj`` as 3-D tensors) is accepted too. Used by checkpoint I/O, weight sync and the engine.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from .config import ModelConfig

_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|rotary_emb\.original_inv_freq)$")


def _split_stacked(name: str, t: torch.Tensor, expert_start: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    prefix = name.rsplit(".", 1)[0]
    if name.endswith("experts.gate_up_proj"):
        inter = t.shape[1] // 2
        for i in range(t.shape[0]):
            yield f"{prefix}.{expert_start + i}.gate_proj.weight", t[i, :inter]
            yield f"{prefix}.{expert_start + i}.up_proj.weight", t[i, inter:]
    elif name.endswith("experts.down_proj"):
        for i in range(t.shape[0]):
            yield f"{prefix}.{expert_start + i}.down_proj.weight", t[i]
    else:
        yield name, t


def hf_items_from_state_dict(
    config: ModelConfig | None, state_dict: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Map full (e.g. FSDP-gathered) tensors under Miles names to (hf_name, tensor) pairs (views, no copies).

    Tied models: an ``lm_head.weight`` entry is dropped (HF stores only the embedding).
    """
    items = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
    tied = config is not None and config.tie_word_embeddings
    for name, t in items:
        if tied and name == "lm_head.weight":
            continue
        yield from _split_stacked(name, t.detach())


def hf_items(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, tensor) for every parameter of a `CausalLM` (detached views; local experts only under EP)."""
    starts = {f"{n}.": getattr(m, "expert_start", 0) for n, m in model.named_modules() if hasattr(m, "expert_start")}
    for name, p in model.named_parameters():
        start = starts.get(name.rsplit(".", 1)[0] + ".", 0)
        yield from _split_stacked(name, p.detach(), start)


def expected_hf_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the model needs, with its shape (without materialising anything)."""
    return {n: tuple(t.shape) for n, t in hf_items(model)}


Dest = tuple[tuple[str, ...], torch.Tensor, object]  # (slots filled, destination view, index into the source)


class HFMapper:
    """Resolves HF names to destination views in a model."""

    def __init__(self, model: nn.Module):
        self.params = dict(model.named_parameters())
        self.experts = {n: m for n, m in model.named_modules() if hasattr(m, "expert_start")}
        self.tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)

    def targets(self, name: str, shape: tuple[int, ...]) -> list[Dest] | None:
        """Destinations of HF tensor ``name``: [] = known but not needed here, None = unknown name."""
        if _IGNORED.search(name) or (self.tied and name == "lm_head.weight"):
            return []
        m = _PER_EXPERT.match(name)
        if m:
            prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
            mod = self.experts.get(prefix)
            if mod is None or not 0 <= e < mod.num_experts:
                return None
            i = e - mod.expert_start
            if not 0 <= i < mod.num_local_experts:
                return []
            if kind == "down_proj":
                return [((name,), mod.down_proj[i], ...)]
            inter = mod.gate_up_proj.shape[1] // 2
            rows = slice(0, inter) if kind == "gate_proj" else slice(inter, 2 * inter)
            return [((name,), mod.gate_up_proj[i, rows], ...)]
        prefix, _, leaf = name.rpartition(".")
        if prefix in self.experts and leaf in ("gate_up_proj", "down_proj") and len(shape) == 3:
            mod = self.experts[prefix]  # fused layout [E, ...] over all experts: take the local slice
            kinds = ("down_proj",) if leaf == "down_proj" else ("gate_proj", "up_proj")
            out = []
            for i in range(mod.num_local_experts):
                e = mod.expert_start + i
                slots = tuple(f"{prefix}.{e}.{k}.weight" for k in kinds)
                out.append((slots, getattr(mod, leaf)[i], e if shape[0] == mod.num_experts else i))
            return out
        if name in self.params:
            return [((name,), self.params[name], ...)]
        return None


@torch.no_grad()
def load_hf_items(
    model: nn.Module, items: Iterable[tuple[str, torch.Tensor]], strict: bool = False, source: str = "<items>"
) -> set[str]:
    """Copy HF-named tensors into ``model`` in place (dtype/device converted). Returns the HF names loaded.

    Unknown names, wrong shapes and duplicates always raise (naming ``source`` and the tensor); with
    ``strict=True`` every tensor the model needs must be present (weight-sync buckets use ``strict=False``).
    """
    mapper = HFMapper(model)
    done: set[str] = set()
    loaded: set[str] = set()
    for name, t in items:
        dests = mapper.targets(name, tuple(t.shape))
        if dests is None:
            raise KeyError(f"{source}: unexpected tensor {name!r} (shape {list(t.shape)}) not in the model")
        for slots, dst, idx in dests:
            if idx is not ... and (t.dim() == 0 or not 0 <= idx < t.shape[0]):
                raise ValueError(f"{source}: tensor {name!r} has shape {list(t.shape)}, too few experts")
            src = t[idx]
            if tuple(src.shape) != tuple(dst.shape):
                want = list(dst.shape) if idx is ... else ["E", *dst.shape]
                raise ValueError(f"{source}: tensor {name!r} has shape {list(t.shape)}, model expects {want}")
            dup = done.intersection(slots)
            if dup:
                raise ValueError(f"{source}: tensor {name!r} duplicates already-loaded {sorted(dup)[0]!r}")
            done.update(slots)
            dst.copy_(src)
        loaded.add(name)
    if strict:
        missing = sorted(set(expected_hf_shapes(model)) - done)
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise KeyError(f"{source}: missing tensors {missing[:5]}{more}")
    return loaded
