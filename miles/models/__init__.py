"""Miles model layer: one pure-PyTorch definition per architecture, shared by the trainer and the engine."""

from .attention import AttentionBackend, VarlenAttention
from .config import SUPPORTED, ConfigError, ModelConfig
from .hf_io import CheckpointError, copy_tokenizer_files, load_model, load_tokenizer, save_model
from .logprobs import token_logprobs
from .model import CausalLM
from .moe import Experts, Router, SparseMoeBlock
from .names import hf_items, hf_items_from_state_dict, load_hf_items
from .routing import RoutingCapture

__all__ = [
    "SUPPORTED",
    "AttentionBackend",
    "CausalLM",
    "CheckpointError",
    "ConfigError",
    "Experts",
    "ModelConfig",
    "Router",
    "RoutingCapture",
    "SparseMoeBlock",
    "VarlenAttention",
    "copy_tokenizer_files",
    "hf_items",
    "hf_items_from_state_dict",
    "load_hf_items",
    "load_model",
    "load_tokenizer",
    "save_model",
    "token_logprobs",
]
