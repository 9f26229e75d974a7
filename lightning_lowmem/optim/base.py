"""What every optimizer of the package shares: how parameters are given, and exact state round trips.

``LowMemOptimizer`` is a ``torch.optim.Optimizer`` that

* accepts a model, ``model.named_parameters()``, plain parameters, or param-group dicts whose
  ``params`` are tensors or ``(name, tensor)`` pairs; frozen parameters of a model are left out;
* refuses complex parameters at construction and sparse gradients at the step, with clear errors;
* restores every state tensor to the dtype it was saved with: ``Optimizer.load_state_dict`` casts
  floating state to the parameter's dtype, which would silently turn fp32 second moments of a bf16
  model into bf16, and int16/uint8 compressed state into floats;
* lets subclasses check a loaded state dict (``_check_param_state``) so a checkpoint of another
  optimizer or another partition fails with a message naming the parameter and the key.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

ParamsLike = nn.Module | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict[str, Any]]


def param_groups_from(params: ParamsLike) -> tuple[list[dict[str, Any]], bool]:
    """Normalise the accepted ``params`` forms into param-group dicts, and say if the caller grouped them.

    A module gives one group of its trainable parameters with their names; an iterable of
    ``(name, tensor)`` pairs gives one named group; an iterable of tensors one unnamed group; an
    iterable of dicts is returned as given (torch reads names from ``(name, tensor)`` pairs).

    Raises:
        ValueError: if there are no parameters.
    """
    if isinstance(params, nn.Module):
        params = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    elif isinstance(params, torch.Tensor):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or dicts, "
            f"but got {torch.typename(params)}"
        )
    params = list(params)
    if not params:
        raise ValueError("The optimizer got an empty parameter list: does the model have trainable parameters?")
    if isinstance(params[0], dict):
        return params, True
    return [{"params": params}], False


class LowMemOptimizer(Optimizer):
    """Base class: parameter forms, input checks and dtype-exact ``load_state_dict``."""

    def __init__(self, params: ParamsLike, defaults: dict[str, Any]) -> None:
        super().__init__(param_groups_from(params)[0], defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if torch.is_complex(p):
                    raise ValueError(
                        f"{type(self).__name__} does not support complex parameters "
                        f"({self.param_name(p)!r} is {p.dtype}); optimize torch.view_as_real(p) instead."
                    )

    # ---- names ---------------------------------------------------------------------------------

    def param_name(self, param: torch.Tensor) -> str:
        """The parameter's name if it was given, else ``group<i>.param<j>``."""
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p is param:
                    names = group.get("param_names")
                    return names[pi] if names else f"group{gi}.param{pi}"
        raise KeyError("parameter is not managed by this optimizer")

    def named_params(self) -> list[tuple[str, torch.Tensor, dict[str, Any]]]:
        """``(name, parameter, group)`` for every parameter, in state-dict order."""
        out = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                out.append((names[pi] if names else f"group{gi}.param{pi}", p, group))
        return out

    def _grad_of(self, param: torch.Tensor) -> torch.Tensor | None:
        grad = param.grad
        if grad is not None and grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients ({self.param_name(param)!r}); "
                "use nn.Embedding(sparse=False) or torch.optim.SparseAdam for that parameter."
            )
        return grad

    # ---- state dict ----------------------------------------------------------------------------

    def _check_param_state(self, name: str, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` (one parameter's saved state) does not fit ``param``."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like ``torch.optim.Optimizer`` after checking every parameter's state, keeping saved dtypes.

        Raises:
            ValueError: if the state dict has other groups, other parameter names, other state keys
                or other state shapes than this optimizer would produce.
        """
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Cannot load optimizer state: it has {len(saved_groups)} param groups, "
                f"this {type(self).__name__} has {len(self.param_groups)}."
            )
        saved_state = state_dict.get("state", {})
        saved_params = _saved_params(saved_groups)
        ours = self.named_params()
        if len(saved_params) != len(ours):
            raise ValueError(
                f"Cannot load optimizer state: it holds {len(saved_params)} parameters, "
                f"this {type(self).__name__} has {len(ours)}; build the optimizer over the same model."
            )
        for (saved_id, saved_name), (name, param, group) in zip(saved_params, ours):
            if saved_name is not None and group.get("param_names") and saved_name != name:
                raise ValueError(
                    f"Cannot load optimizer state: the state dict holds {saved_name!r} where this optimizer "
                    f"has {name!r}; build the optimizer over the same model, with the same groups."
                )
            if saved_id in saved_state:
                self._check_param_state(name, param, group, saved_state[saved_id])
        super().load_state_dict(state_dict)
        self._restore_saved_dtypes(saved_groups, saved_state)

    def _restore_saved_dtypes(self, saved_groups: list[dict[str, Any]], saved_state: dict[Any, Any]) -> None:
        for (saved_id, _), (_, param, _) in zip(_saved_params(saved_groups), self.named_params()):
            for key, value in saved_state.get(saved_id, {}).items():
                if torch.is_tensor(value) and key != "step":
                    current = self.state[param][key]
                    if current.dtype != value.dtype:
                        self.state[param][key] = value.to(device=current.device)


def _saved_params(saved_groups: list[dict[str, Any]]) -> list[tuple[Any, str | None]]:
    """``(state id, name or None)`` of every parameter of a saved state dict, in order."""
    out: list[tuple[Any, str | None]] = []
    for group in saved_groups:
        names = group.get("param_names") or [None] * len(group["params"])
        out.extend(zip(group["params"], names))
    return out
