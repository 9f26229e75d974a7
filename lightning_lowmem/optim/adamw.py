"""``NamedAdamW``: ``torch.optim.AdamW`` over a model's named weight-decay groups, naming groups added later.

The AdamW baseline the mixin builds has named groups (a named state dict, and the same weight-decay
groups as the block optimizers). torch refuses a later group of plain tensors in such an optimizer,
which is what Lightning's ``BaseFinetuning`` adds when it unfreezes layers; this subclass names them
from the model it was built on and is otherwise ``torch.optim.AdamW``, step for step.

Example::

    >>> optimizer = NamedAdamW(model, lr=1e-3, weight_decay=0.1)   # biases and norms: no decay
    >>> optimizer.add_param_group({"params": list(model.backbone.parameters())})
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_lowmem.optim.base import ModelNamedGroups, ParamsLike
from lightning_lowmem.optim.param_groups import model_decay_groups
from lightning_lowmem.partition import NO_DECAY_ROLES


class NamedAdamW(ModelNamedGroups, torch.optim.AdamW):
    """``torch.optim.AdamW`` that also takes a model, and names plain tensors added later.

    Args:
        params: a model (its trainable parameters in a decayed and a ``weight_decay=0`` group,
            split by ``no_decay`` roles, as :class:`~lightning_lowmem.optim.block_adam.BlockAdam`
            splits them), or anything ``torch.optim.AdamW`` takes.
        *args, **kwargs: ``torch.optim.AdamW``'s.
        no_decay: roles without weight decay when ``params`` is a model.

    Example::

        >>> optimizer = NamedAdamW(model, lr=3e-4)
        >>> optimizer.param_groups[1]["weight_decay"]
        0.0
    """

    def __init__(self, params: ParamsLike, *args: Any, no_decay: Sequence[str] = NO_DECAY_ROLES, **kwargs: Any) -> None:
        model = params if isinstance(params, nn.Module) else None
        super().__init__(model_decay_groups(model, no_decay) if model is not None else params, *args, **kwargs)
        if model is not None:
            self.bind_model(model)
