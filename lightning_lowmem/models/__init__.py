"""Reference models for examples, tests, benchmarks and memory estimates (GPT-2 and Llama layouts)."""

from lightning_lowmem.models.gpt import GPT, MLP, Block, CausalSelfAttention, GPTConfig
from lightning_lowmem.models.known import KNOWN_MODELS, build_meta_model, config_from_hf_json
from lightning_lowmem.models.llama import Llama, LlamaConfig

__all__ = [
    "GPT",
    "KNOWN_MODELS",
    "MLP",
    "Block",
    "CausalSelfAttention",
    "GPTConfig",
    "Llama",
    "LlamaConfig",
    "build_meta_model",
    "config_from_hf_json",
]
