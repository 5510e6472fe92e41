"""HF checkpoint I/O: ``load_model`` (meta init, stream safetensors into params), ``save_model``, tokenizers."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .model import CausalLM
from .names import HFMapper, expected_hf_shapes, hf_items, hf_items_from_state_dict, load_hf_items

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


def checkpoint_files(path: str | Path) -> dict[str, list[str]]:
    """{safetensors file: [tensor names]} of an HF directory (single file or sharded via the index)."""
    path = Path(path)
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: invalid index ({e!r})") from e
        files: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(str(path / shard), []).append(name)
        for shard in files:
            if not Path(shard).is_file():
                raise CheckpointError(f"{index}: shard {Path(shard).name} is missing (listed in the index)")
        return files
    if (path / SINGLE).is_file():
        return {str(path / SINGLE): []}
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX} found")


def _read_headers(files: dict[str, list[str]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (file, shape)} from the safetensors headers; checks the index agrees with each shard."""
    where: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file, listed in files.items():
        try:
            with safe_open(file, framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({e})") from e
        for k in listed:
            if k not in shapes:
                raise CheckpointError(f"{file}: tensor {k!r} listed in {INDEX} is not in this shard")
        for k, shape in shapes.items():
            if k in where:
                raise CheckpointError(f"{file}: tensor {k!r} also stored in {where[k][0]}")
            where[k] = (file, shape)
    return where


def _validate(model: CausalLM, where: dict[str, tuple[str, tuple[int, ...]]], source: Path) -> None:
    """Every tensor the model needs exists exactly once with the right shape; nothing unknown."""
    mapper = HFMapper(model)
    need = expected_hf_shapes(model)
    covered: set[str] = set()
    for name, (file, shape) in where.items():
        dests = mapper.targets(name, shape)
        if dests is None:
            raise CheckpointError(f"{file}: unexpected tensor {name!r} {list(shape)} (not part of the model)")
        for slots, dst, idx in dests:
            got = shape if idx is ... else shape[1:]
            if tuple(got) != tuple(dst.shape) or (idx is not ... and not 0 <= idx < shape[0]):
                raise CheckpointError(f"{file}: tensor {name!r} has shape {list(shape)}, expected {list(dst.shape)}")
            if covered.intersection(slots):
                raise CheckpointError(f"{file}: tensor {name!r} duplicates another tensor of the checkpoint")
            covered.update(slots)
    missing = sorted(set(need) - covered)
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: missing tensors {missing[:5]}{more}")


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CausalLM:
    """Build a `CausalLM` from an HF directory: meta-device init, validate headers, stream tensors into params."""
    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    with torch.device("meta"):
        model = CausalLM(config)
    where = _read_headers(checkpoint_files(path))
    _validate(model, where, path)
    model = model.to(dtype).to_empty(device=device)  # dtype change on meta is free; no extra copy
    by_file: dict[str, list[str]] = {}
    for name, (file, _) in where.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                load_hf_items(model, ((n, f.get_tensor(n)) for n in names), source=file)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: failed to read tensors ({e})") from e
    return model.eval()


def parse_size(size: int | str) -> int:
    """'5GB' / '20KB' / '100MiB' / int -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if not m:
        raise ValueError(f"invalid max_shard_size {size!r}")
    unit = m.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    mult = base ** (" KMGT".index(unit[0]) if unit else 0)
    return int(float(m.group(1)) * mult)


def save_model(
    model_or_state: CausalLM | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    path: str | Path,
    *,
    config: ModelConfig | None = None,
    max_shard_size: int | str | None = None,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Write config.json + safetensors (+ index when sharded) that ``AutoModelForCausalLM`` loads unchanged.

    ``model_or_state``: a `CausalLM`, or a state dict under Miles names (e.g. FSDP-gathered) with ``config``.
    ``tokenizer_from``: copy tokenizer / chat-template files from that directory.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(model_or_state, CausalLM):
        config = model_or_state.config
        items = list(hf_items(model_or_state))
    else:
        if config is None:
            raise ValueError("save_model: a state dict needs config=ModelConfig")
        items = list(hf_items_from_state_dict(config, model_or_state))
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    hf = config.to_hf()
    hf["dtype"] = str(items[0][1].dtype).removeprefix("torch.") if items else "float32"
    hf.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    for old in list(path.glob("model*.safetensors")) + [path / INDEX]:
        old.unlink(missing_ok=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in shard}
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer_from is not None:
        copy_tokenizer_files(tokenizer_from, path)
    return path


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """Copy tokenizer, chat template and generation config files (those that exist) from ``src`` to ``dst``."""
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file() and f.resolve() != (Path(dst) / name).resolve():
            shutil.copy2(f, Path(dst) / name)


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (with its chat template) through ``transformers.AutoTokenizer``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
