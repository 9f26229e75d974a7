"""Published model shapes by name, Hugging Face ``config.json`` files, and models built on the meta device.

Nothing here downloads anything: the known shapes are written out below, and a ``config.json`` is
read from a local path. A model is built under ``torch.device("meta")``, so its parameters have
shapes and no memory: a 70B model is built in a fraction of a second, ready for
:func:`~lightning_lowmem.partition.build_plan` and memory estimates.

Parameter counts of the known models (checked in the tests):

==============  ==============  ===========================================================
name            parameters      shape
==============  ==============  ===========================================================
gpt2            124,439,808     12 layers, width 768, 12 heads, vocab 50257, 1024 positions
gpt2-medium     354,823,168     24 layers, width 1024, 16 heads
gpt2-large      774,030,080     36 layers, width 1280, 20 heads
gpt2-xl         1,557,611,200   48 layers, width 1600, 25 heads
tinyllama-1b    1,100,048,384   22 layers, width 2048, MLP 5632, 32 heads / 4 KV heads, vocab 32000
llama2-7b       6,738,415,616   32 layers, width 4096, MLP 11008, 32 heads, vocab 32000
llama2-13b      13,015,864,320  40 layers, width 5120, MLP 13824, 40 heads
llama2-70b      68,976,648,192  80 layers, width 8192, MLP 28672, 64 heads / 8 KV heads
llama3-8b       8,030,261,248   32 layers, width 4096, MLP 14336, 32 heads / 8 KV heads, vocab 128256
==============  ==============  ===========================================================

GPT-2 models tie the output head to the token embedding (counted once) and have biases; Llama
models have untied heads and no biases.

Example::

    >>> model = build_meta_model("llama2-7b")          # or a path to a config.json
    >>> sum(p.numel() for p in model.parameters())
    6738415616
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from lightning_lowmem.models.gpt import GPT, GPTConfig
from lightning_lowmem.models.hf import HFConfigError, HFModelConfig, build_hf_model, describe_hf_config, hf_config
from lightning_lowmem.models.llama import Llama, LlamaConfig

ModelConfig = GPTConfig | LlamaConfig | HFModelConfig


class ModelSpecError(ValueError):
    """A model name or config file that cannot be turned into a model; the message says why and what to do."""


def _llama(**fields: Any) -> LlamaConfig:
    return LlamaConfig(rms_norm_eps=1e-5, tie_word_embeddings=False, **fields)


#: Known model names -> their published shapes (GPT-2: OpenAI's checkpoints; Llama: Meta's and
#: TinyLlama's ``config.json``).
KNOWN_MODELS: Mapping[str, ModelConfig] = MappingProxyType(
    {
        "gpt2": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
        "gpt2-medium": GPTConfig(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
        "gpt2-large": GPTConfig(vocab_size=50257, block_size=1024, n_layer=36, n_head=20, n_embd=1280),
        "gpt2-xl": GPTConfig(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600),
        "tinyllama-1b": _llama(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                               num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
        "llama2-7b": _llama(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
        "llama2-13b": _llama(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                             num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
        "llama2-70b": _llama(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                             num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
        "llama3-8b": _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                            rope_theta=500000.0),
    }
)

#: ``model_type`` values of a ``config.json`` that :func:`config_from_hf_json` reads.
GPT2_MODEL_TYPES = frozenset({"gpt2"})
LLAMA_MODEL_TYPES = frozenset({"llama", "mistral"})


def known_config(name: str) -> ModelConfig:
    """The published shape of a known model (case-insensitive name).

    Raises:
        ModelSpecError: listing the known names when ``name`` is not one.
    """
    config = KNOWN_MODELS.get(name.strip().lower())
    if config is None:
        raise ModelSpecError(
            f"Unknown model {name!r}. Known models: {', '.join(KNOWN_MODELS)}; or give the path to a "
            "Hugging Face config.json (any model_type transformers knows; gpt2, llama or mistral without it)."
        )
    return config


def resolve_config(name_or_path: str | os.PathLike[str]) -> ModelConfig:
    """The config of a known model name, a ``config.json`` path, or a directory holding one.

    A known name wins over a file of the same name in the working directory.

    Raises:
        ModelSpecError: for an unknown name, an unreadable or invalid file, or an unsupported model.
    """
    text = os.fspath(name_or_path)
    if text.strip().lower() in KNOWN_MODELS:
        return KNOWN_MODELS[text.strip().lower()]
    looks_like_path = os.sep in text or "/" in text or text.endswith(".json") or os.path.exists(text)
    if not looks_like_path:
        return known_config(text)  # raises, listing the known names
    return config_from_hf_json(text)


def describe_config(config: ModelConfig) -> str:
    """One line saying what the config builds, e.g. ``"Llama: 32 layers, width 4096, ..."``."""
    if isinstance(config, HFModelConfig):
        return describe_hf_config(config)
    if isinstance(config, GPTConfig):
        head = "tied" if config.tie_weights else "untied"
        return (
            f"GPT-2: {config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, vocab {config.vocab_size}, "
            f"{config.block_size} positions, {head} output head"
        )
    head = "tied" if config.tie_word_embeddings else "untied"
    return (
        f"Llama: {config.num_hidden_layers} layers, width {config.hidden_size}, MLP {config.intermediate_size}, "
        f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV heads of {config.head_dim}, "
        f"vocab {config.vocab_size}, {head} output head"
    )


def build_model(config: ModelConfig) -> nn.Module:
    """A :class:`GPT` or :class:`Llama` for ``config`` on the current default device; a
    Hugging Face config through ``transformers``, always on the meta device.

    Raises:
        ModelSpecError: if ``transformers`` refuses a Hugging Face config.
    """
    if isinstance(config, GPTConfig):
        return GPT(config)
    if isinstance(config, LlamaConfig):
        return Llama(config)
    if isinstance(config, HFModelConfig):
        try:
            return build_hf_model(config)
        except HFConfigError as err:
            raise ModelSpecError(str(err)) from None
    raise TypeError(f"Expected a GPTConfig, LlamaConfig or HFModelConfig, got {type(config).__name__}.")


def build_meta_model(name_or_path: str | os.PathLike[str] | ModelConfig) -> nn.Module:
    """The model for a known name, a ``config.json`` path or a config, on the meta device (no memory).

    Raises:
        ModelSpecError: as :func:`resolve_config`.
    """
    config = name_or_path if isinstance(name_or_path, (GPTConfig, LlamaConfig, HFModelConfig)) else resolve_config(name_or_path)
    with torch.device("meta"):
        return build_model(config)


def config_from_hf_json(path: str | os.PathLike[str]) -> ModelConfig:
    """Read a Hugging Face ``config.json`` (or a directory holding one) into our config.

    ``model_type`` ``gpt2`` maps ``n_layer``/``n_head``/``n_embd``/``vocab_size``/``n_positions``
    (and ``tie_word_embeddings``, default true) to a :class:`GPTConfig`; our GPT's MLP is
    ``4 * n_embd`` wide, so a config with another ``n_inner`` is refused. ``llama`` and ``mistral``
    map ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim``, ``vocab_size``, ``rms_norm_eps``, ``rope_theta``,
    ``max_position_embeddings``, ``tie_word_embeddings``, ``attention_bias`` and ``mlp_bias`` to a
    :class:`LlamaConfig`, with Hugging Face's defaults for the optional ones. ``rope_scaling`` and
    ``sliding_window`` change no parameter and are not modelled. Any other ``model_type`` that
    ``transformers`` (when installed) knows becomes an :class:`HFModelConfig`, built through
    ``transformers`` (:mod:`lightning_lowmem.models.hf`).

    Raises:
        ModelSpecError: if the file cannot be read, is not a JSON object, has no or an unsupported
            ``model_type``, lacks a required field, or describes a shape the config classes refuse.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ModelSpecError(
            f"No such config file: {path!r}. Give a known model name ({', '.join(KNOWN_MODELS)}) or the path "
            "to a Hugging Face config.json."
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ModelSpecError(f"Cannot read config file {path!r}: {err}.") from None
    except json.JSONDecodeError as err:
        raise ModelSpecError(
            f"{path!r} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "give a Hugging Face config.json."
        ) from None
    if not isinstance(raw, dict):
        raise ModelSpecError(
            f"{path!r} holds a JSON {type(raw).__name__}, not an object; give a Hugging Face config.json."
        )
    model_type = raw.get("model_type")
    supported = ", ".join(sorted(GPT2_MODEL_TYPES | LLAMA_MODEL_TYPES))
    if model_type is None:
        raise ModelSpecError(
            f"{path!r} has no 'model_type'; supported model types: any transformers knows, and {supported} "
            "without transformers."
        )
    try:
        if model_type in GPT2_MODEL_TYPES:
            return _gpt2_config(raw, path)
        if model_type in LLAMA_MODEL_TYPES:
            return _llama_config(raw, path)
    except ModelSpecError:
        raise
    except (ValueError, TypeError) as err:  # a shape the config class refuses, a field of the wrong type
        raise ModelSpecError(f"{path!r}: {err}") from None
    try:
        return hf_config(raw)
    except HFConfigError as err:
        raise ModelSpecError(
            f"{path!r}: {err}; supported model types: any transformers knows, and {supported} without transformers."
        ) from None


def _required(raw: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in raw:
        raise ModelSpecError(f"{path!r} has no {key!r}, which a {raw['model_type']} config needs.")
    return raw[key]


def _gpt2_config(raw: Mapping[str, Any], path: str) -> GPTConfig:
    n_embd = _required(raw, "n_embd", path)
    n_inner = raw.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise ModelSpecError(
            f"{path!r} has n_inner={n_inner}, but this package's GPT has an MLP of 4 * n_embd = {4 * n_embd}; "
            "only configs with n_inner null or 4 * n_embd are supported."
        )
    return GPTConfig(
        vocab_size=_required(raw, "vocab_size", path),
        block_size=raw.get("n_positions", raw.get("n_ctx", 1024)),
        n_layer=_required(raw, "n_layer", path),
        n_head=_required(raw, "n_head", path),
        n_embd=n_embd,
        tie_weights=bool(raw.get("tie_word_embeddings", True)),
    )


def _llama_config(raw: Mapping[str, Any], path: str) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=_required(raw, "vocab_size", path),
        hidden_size=_required(raw, "hidden_size", path),
        intermediate_size=_required(raw, "intermediate_size", path),
        num_hidden_layers=_required(raw, "num_hidden_layers", path),
        num_attention_heads=_required(raw, "num_attention_heads", path),
        num_key_value_heads=raw.get("num_key_value_heads"),
        head_dim=raw.get("head_dim"),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        rope_theta=raw.get("rope_theta", 10000.0),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
    )
