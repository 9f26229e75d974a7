"""Any Hugging Face ``config.json`` as a model on the meta device, through ``transformers``.

``transformers`` is optional: it is imported inside the functions here, and a config whose
``model_type`` it does not know (or any config when it is not installed) gets a
:class:`~lightning_lowmem.models.known.ModelSpecError`-style message naming what is supported.
The model is the family's causal-LM class where it has one (``MixtralForCausalLM``), else its base
model (``BertModel``, ``T5Model``), built under ``torch.device("meta")``: shapes, no memory, no
download. A 70B-class mixture-of-experts is built in seconds.

Example::

    >>> config = hf_config({"model_type": "mixtral", "num_local_experts": 8, ...})
    >>> model = build_hf_model(config)                  # on the meta device
    >>> type(model).__name__
    'MixtralForCausalLM'
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class HFConfigError(ValueError):
    """A ``config.json`` ``transformers`` cannot build; the message says why and what is supported."""


@dataclasses.dataclass(frozen=True)
class HFModelConfig:
    """A Hugging Face config to build through ``transformers``.

    Args:
        model_type: the ``config.json``'s ``model_type`` (``"mixtral"``, ``"gpt_neox"``, ...).
        fields: the ``config.json`` as read (what ``transformers`` does not set keeps its default).
    """

    model_type: str
    fields: Mapping[str, Any]


def transformers_version() -> str | None:
    """The installed ``transformers`` version, or ``None`` when it is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    return str(transformers.__version__)


def hf_config(fields: Mapping[str, Any]) -> HFModelConfig:
    """Check that ``transformers`` knows ``fields["model_type"]`` and wrap the config.

    Raises:
        HFConfigError: when ``transformers`` is not installed or does not know the model type.
    """
    model_type = fields.get("model_type")
    version = transformers_version()
    if version is None:
        raise HFConfigError(
            f"model_type {model_type!r} needs transformers to be built (pip install transformers), "
            "which is not installed"
        )
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise HFConfigError(f"model_type {model_type!r} is not one the installed transformers ({version}) knows")
    return HFModelConfig(str(model_type), dict(fields))


def _transformers_config(config: HFModelConfig) -> Any:
    from transformers import AutoConfig

    fields = {k: v for k, v in config.fields.items() if k not in ("model_type", "architectures", "auto_map")}
    return AutoConfig.for_model(config.model_type, **fields)


def build_hf_model(config: HFModelConfig) -> nn.Module:
    """The ``transformers`` model of ``config`` on the meta device: the causal-LM class if the family
    has one, else the base model.

    Raises:
        HFConfigError: if ``transformers`` refuses the config (a missing or inconsistent field).
    """
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)  # config checks about token ids that no shape depends on
    try:
        hf = _transformers_config(config)
        with torch.device("meta"):
            try:
                return AutoModelForCausalLM.from_config(hf)
            except ValueError:  # the family has no causal-LM head (BERT, T5, ViT): its base model
                return AutoModel.from_config(hf)
    except (ValueError, TypeError, KeyError, AttributeError, AssertionError) as err:
        raise HFConfigError(f"transformers cannot build this {config.model_type} config: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def describe_hf_config(config: HFModelConfig) -> str:
    """One line: family, layers, width, heads, experts, as ``transformers`` reads the config."""
    hf = _transformers_config(config)
    facts = []
    for label, attrs in (
        ("layers", ("num_hidden_layers", "n_layer", "num_layers")),
        ("width", ("hidden_size", "n_embd", "d_model", "dim")),
        ("heads", ("num_attention_heads", "n_head", "num_heads", "n_heads")),
        ("KV heads", ("num_key_value_heads", "num_kv_heads")),
        ("experts", ("num_local_experts", "num_experts", "n_routed_experts")),
        ("vocab", ("vocab_size",)),
    ):
        value = next((getattr(hf, a) for a in attrs if isinstance(getattr(hf, a, None), int)), None)
        if value is not None:
            facts.append(f"{value} {label}" if label in ("layers", "heads", "KV heads", "experts") else f"{label} {value}")
    return f"{config.model_type} (transformers): " + ", ".join(facts)
