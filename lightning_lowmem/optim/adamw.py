"""``NamedAdamW``: ``torch.optim.AdamW`` that names the plain tensors of groups added to its named groups.

The AdamW baseline the mixin builds has named groups (a named state dict, and the same weight-decay
groups as the block optimizers). torch refuses a later group of plain tensors in such an optimizer,
which is what Lightning's ``BaseFinetuning`` adds when it unfreezes layers; this subclass names them
from the model it is bound to and is otherwise ``torch.optim.AdamW``, step for step.

Example::

    >>> optimizer = NamedAdamW(decay_groups(model, ("bias", "norm")), lr=1e-3)
    >>> optimizer.bind_model(model)
    >>> optimizer.add_param_group({"params": list(model.backbone.parameters())})
"""

from __future__ import annotations

import torch

from lightning_lowmem.optim.base import ModelNamedGroups


class NamedAdamW(ModelNamedGroups, torch.optim.AdamW):
    """``torch.optim.AdamW`` whose ``add_param_group`` names plain tensors (see :class:`ModelNamedGroups`)."""
