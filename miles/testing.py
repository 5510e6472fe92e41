"""Offline test fixtures: a small trained BPE tokenizer and tiny random HF checkpoints.

Nothing here touches the network. Every later test builds its model/tokenizer with these helpers:

    tok = make_tokenizer(tmp_path / "tok")
    ckpt = make_checkpoint(tmp_path / "ckpt", "qwen3_moe")
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]
ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model learns to add numbers and answer questions.
What is the sum of two and three? The answer is five. Let us think step by step before we answer.
Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May? Answer: 48 + 24 = 72. The answer is 72.
The user asks a question and the assistant solves it. The assistant first thinks about the reasoning
process and then provides the user with the answer. Please put the final answer within \\boxed{}.
Reinforcement learning from human feedback trains a policy with rewards. The reward is one when the
answer is correct and zero otherwise. Each prompt gets several samples; advantages are normalized per group.
Once upon a time there was a little robot who liked to count: one, two, three, four, five, six, seven,
eight, nine, ten. It counted stars at night and apples in the day. Hello world! How are you today?
I am fine, thank you. Please write a short poem about the sea. The sea is blue and the sky is wide.
If x = 3 and y = 4, then x * y = 12 and x + y = 7. Solve 2x + 5 = 11, so 2x = 6 and x = 3.
The square of 9 is 81. The square root of 144 is 12. Ten percent of 250 is 25. Half of 90 is 45.
"""


def _corpus() -> list[str]:
    """A fixed English + digits + arithmetic corpus (deterministic)."""
    rng = random.Random(0)
    lines = _TEXT.splitlines()
    for _ in range(400):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        r = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"What is {a} {op} {b}? {a} {op} {b} = {r}. The answer is \\boxed{{{r}}}.")
    return lines


def make_tokenizer(path: str | Path | None = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on the built-in corpus and (optionally) save it to ``path``.

    Special tokens: ``<|endoftext|>`` (eos and pad), ``<|im_start|>``, ``<|im_end|>``; ChatML chat template
    with ``add_generation_prompt``. Returns a ``PreTrainedTokenizerFast`` loadable via ``AutoTokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(path))
    return fast


def _hf_config(arch: str, vocab_size: int, tok, tie: bool, overrides: dict):
    import transformers

    base = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=tie,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    if arch == "llama":
        cls = transformers.LlamaConfig
        base["rope_parameters"] = dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=256,
        )
    elif arch == "qwen2":
        cls = transformers.Qwen2Config
        base["rope_parameters"] = dict(rope_type="default", rope_theta=1000000.0)
    elif arch == "qwen3":
        cls = transformers.Qwen3Config
        base["rope_parameters"] = dict(rope_type="default", rope_theta=1000000.0)
    elif arch == "qwen3_moe":
        cls = transformers.Qwen3MoeConfig
        base["rope_parameters"] = dict(rope_type="default", rope_theta=1000000.0)
        base.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
    else:
        raise ValueError(f"make_checkpoint: unknown arch {arch!r}; choose one of {ARCHS}")
    base.update(overrides)
    return cls(**base)


def make_checkpoint(
    path: str | Path,
    arch: str = "qwen3",
    *,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    **config_overrides,
) -> Path:
    """Write a tiny random HF checkpoint (config.json + safetensors + tokenizer) for ``arch`` into ``path``.

    ``arch`` is one of ``llama`` (llama3 RoPE scaling), ``qwen2`` (qkv bias), ``qwen3`` (q/k norm),
    ``qwen3_moe`` (8 experts, top-2). ``config_overrides`` go to the transformers config class
    (e.g. ``num_hidden_layers=3``). ``max_shard_size`` (e.g. ``"20KB"``) writes a sharded checkpoint.
    """
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(path)
    cfg = _hf_config(arch, len(tok), tok, tie_word_embeddings, config_overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _small_init(model, seed, std=cfg.initializer_range)
    model.to(dtype)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kw)
    return path


@torch.no_grad()
def _small_init(model: torch.nn.Module, seed: int, std: float) -> None:
    """Deterministic small-std init (norm weights near 1, biases small) so logits are sane."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("mlp.gate.weight"):  # router: larger std so top-k choices are well separated
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g))
