"""What every optimizer of the package shares: how parameters are given, and exact state round trips.

``LowMemOptimizer`` is a ``torch.optim.Optimizer`` that

* accepts a model, ``model.named_parameters()``, plain parameters, or param-group dicts whose
  ``params`` are tensors or ``(name, tensor)`` pairs; frozen parameters of a model are left out;
* names the plain tensors of a group added later (``add_param_group({"params": [tensors]})``, as
  Lightning's ``BaseFinetuning`` does) from the model it was built on (:class:`ModelNamedGroups`);
* survives ``copy.deepcopy``, ``pickle`` and ``torch.save``: attributes listed in
  ``_PICKLED_ATTRIBUTES`` travel with ``Optimizer.__getstate__``'s defaults, state and groups, and
  caches are rebuilt;
* refuses torch's ``foreach``/``fused``/``capturable``/``differentiable`` with what it does instead;
* refuses complex parameters at construction and sparse gradients at the step, with clear errors;
* restores every state tensor to the dtype it was saved with: ``Optimizer.load_state_dict`` casts
  floating state to the parameter's dtype, which would silently turn fp32 second moments of a bf16
  model into bf16, and int16/uint8 compressed state into floats;
* lets subclasses check a loaded state dict (``_check_param_state``) so a checkpoint of another
  optimizer or another partition fails with a message naming the parameter and the key.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, ClassVar

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


#: What each of torch's implementation switches would ask for, and what this package does instead.
TORCH_OPTIONS = {
    "foreach": "the update already runs over all tensors of a group at once; pick the implementation with "
    "backend='auto' (Triton on CUDA, the C kernel on CPU), 'triton', 'compile' or 'torch'",
    "fused": "the fused kernels are chosen with backend='auto' (Triton on CUDA, the C kernel on CPU) or "
    "backend='triton'",
    "capturable": "steps read hyperparameters on the host, so they cannot be captured in a CUDA graph; "
    "run optimizer.step() outside the graph",
    "differentiable": "the step runs under torch.no_grad() and updates in place; for gradients through "
    "the update use torch.optim.AdamW(differentiable=True)",
}


def check_torch_options(owner: str, options: dict[str, Any]) -> None:
    """Refuse torch's implementation switches unless they ask for nothing (``None``/``False``).

    Raises:
        ValueError: for ``foreach``/``fused``/``capturable``/``differentiable`` set to a true value,
            saying what the package does instead.
        TypeError: for any other keyword, as Python does for an unknown argument.
    """
    for key, value in options.items():
        if key not in TORCH_OPTIONS:
            raise TypeError(f"{owner}.__init__() got an unexpected keyword argument {key!r}")
        if value not in (None, False):
            raise ValueError(f"{owner} does not take {key}={value!r}: {TORCH_OPTIONS[key]}.")


class ModelNamedGroups:
    """Optimizer mixin: name the plain tensors of a group added to named groups, from a bound model.

    torch refuses a group of plain tensors in an optimizer whose groups carry names
    (``param_names``); Lightning's ``BaseFinetuning`` adds exactly such a group when it unfreezes
    layers. Once :meth:`bind_model` has been called, ``add_param_group`` looks each tensor up in
    ``model.named_parameters()`` (frozen ones included) and adds ``(name, tensor)`` pairs. The
    model is held by a weak reference and is not carried by ``copy.deepcopy`` or ``pickle``.

    Example::

        >>> optimizer.bind_model(model)
        >>> optimizer.add_param_group({"params": list(model.backbone.parameters()), "lr": 1e-5})
        >>> optimizer.param_groups[-1]["param_names"][:1]
        ['backbone.0.weight']
    """

    _model_ref: weakref.ref[nn.Module] | None = None

    def bind_model(self, model: nn.Module) -> None:
        """Name the plain tensors of groups added later from ``model``'s parameters."""
        self._model_ref = weakref.ref(model)

    @property
    def bound_model(self) -> nn.Module | None:
        """The model given to :meth:`bind_model` (or to the constructor), ``None`` if none or gone."""
        return self._model_ref() if self._model_ref is not None else None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``, naming plain tensors when the other groups are named.

        Raises:
            ValueError: if a plain tensor must be named but no model is bound, or the tensor is not
                a parameter of the bound model.
        """
        super().add_param_group(self._named_group(param_group))  # type: ignore[misc]

    def _named_group(self, param_group: dict[str, Any]) -> dict[str, Any]:
        groups = getattr(self, "param_groups", [])
        if not isinstance(param_group, dict) or not any("param_names" in g for g in groups):
            return param_group
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if "param_names" in param_group or not params or all(isinstance(p, tuple) for p in params):
            return param_group
        owner = type(self).__name__
        model = self.bound_model
        if model is None:
            raise ValueError(
                f"This {owner}'s param groups are named, so a new group needs names too, and no model is bound "
                "to look them up (a copied or unpickled optimizer has none). Pass (name, tensor) pairs: "
                "add_param_group({'params': [(name, p), ...]}), or call bind_model(model) first."
            )
        names = {id(p): n for n, p in model.named_parameters()}
        named = []
        for i, p in enumerate(params):
            if isinstance(p, tuple):
                named.append(p)
            elif id(p) in names:
                named.append((names[id(p)], p))
            else:
                shape = list(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(
                    f"Tensor {i} of the new param group ({shape}) is not a parameter of the {type(model).__name__} "
                    f"this {owner} was built on, so it has no name. Add (name, tensor) pairs instead."
                )
        return {**param_group, "params": named}


class LowMemOptimizer(ModelNamedGroups, Optimizer):
    """Base class: parameter forms, input checks, picklable, dtype-exact ``load_state_dict``."""

    #: Instance attributes, besides torch's defaults, state and groups, that a copy or pickle keeps.
    _PICKLED_ATTRIBUTES: ClassVar[tuple[str, ...]] = ("backend",)

    def __init__(self, params: ParamsLike, defaults: dict[str, Any]) -> None:
        super().__init__(param_groups_from(params)[0], defaults)
        if isinstance(params, nn.Module):
            self.bind_model(params)
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

    # ---- copies and pickles --------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({key: self.__dict__[key] for key in self._PICKLED_ATTRIBUTES if key in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a copy or pickle (the bound model is not carried), or the state ``load_state_dict`` sets."""
        super().__setstate__(state)
        self._reset_caches()

    def _reset_caches(self) -> None:
        """Rebuild what ``__getstate__`` leaves out (caches keyed by tensors)."""

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
