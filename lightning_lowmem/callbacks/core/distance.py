r"""Distance of a model's weights to AdamW's trajectory (Adam-mini paper, appendix A.5; no Lightning inside).

For weights :math:`w` and reference weights :math:`r` (AdamW's, after the same number of steps from
the same initial weights and data order)

.. math::

    \mathrm{L2} = \Big(\sum_i (w_i - r_i)^2\Big)^{1/2}, \qquad
    \mathrm{relative\ L2} = \mathrm{L2} \,/\, \Big(\sum_i r_i^2\Big)^{1/2},

over all trainable parameters and over those of each block kind. The reference comes from

* a *snapshot* of an AdamW run, saved with :func:`save_snapshot` every N steps
  (``torch.distributed.checkpoint``: one directory per step, sharded under FSDP2, loadable on any
  number of ranks), loaded with :func:`load_snapshot` into fresh tensors;
* a :class:`ShadowAdamW`: an AdamW copy of the weights stepped with the live gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.optim import Optimizer

from lightning_lowmem.callbacks.core.kinds import kinds_present
from lightning_lowmem.callbacks.core.reduce import mesh_of, owned_part, sum_over_mesh

_SNAPSHOT = re.compile(r"^step_(\d+)$")


@dataclasses.dataclass(frozen=True)
class Distance:
    """L2 and relative L2 distance of weights to a reference, overall and per block kind.

    Args:
        l2: :math:`\\lVert w - r\\rVert_2` over all parameters.
        rel_l2: ``l2`` divided by :math:`\\lVert r\\rVert_2` (0 when the reference is all zeros).
        by_kind: ``kind -> (l2, rel_l2)`` over the parameters of that kind.
    """

    l2: float
    rel_l2: float
    by_kind: dict[str, tuple[float, float]]


def weight_distance(
    weights: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    kinds: Mapping[str, str],
) -> Distance:
    """The :class:`Distance` of ``weights`` to ``reference`` (same names and global shapes).

    Sums run in float64 over each rank's own part of every tensor (see
    :func:`~lightning_lowmem.callbacks.core.reduce.owned_part`) and are added across ranks in one
    all-reduce when the weights are ``DTensor`` s (then every rank must call it).

    Raises:
        ValueError: if the names or shapes differ (see :func:`check_same_parameters`).
    """
    check_same_parameters({n: tuple(t.shape) for n, t in reference.items()}, {n: tuple(t.shape) for n, t in weights.items()})
    order = kinds_present(kinds[name] for name in weights)
    index = {k: i for i, k in enumerate(order)}
    mesh = mesh_of(weights.values())
    device = next(iter(weights.values())).device if weights else torch.device("cpu")
    sums = torch.zeros(2, len(order), dtype=torch.float64, device=device)
    for name, w in weights.items():
        w_own, r_own = owned_part(w.detach(), mesh), owned_part(reference[name].detach(), mesh)
        if w_own is None or w_own.numel() == 0:
            continue
        i = index[kinds[name]]
        sums[0, i] += torch.linalg.vector_norm(w_own.to(torch.float64) - r_own.to(torch.float64)).square()
        sums[1, i] += torch.linalg.vector_norm(r_own, dtype=torch.float64).square()
    sums = sum_over_mesh(sums, mesh).cpu().tolist()
    by_kind = {k: _l2_and_relative(sums[0][i], sums[1][i]) for k, i in index.items()}
    l2, rel = _l2_and_relative(sum(sums[0]), sum(sums[1]))
    return Distance(l2, rel, by_kind)


def _l2_and_relative(diff_sq: float, ref_sq: float) -> tuple[float, float]:
    l2 = math.sqrt(diff_sq)
    return l2, (l2 / math.sqrt(ref_sq) if ref_sq > 0 else 0.0)


def check_same_parameters(reference: Mapping[str, tuple[int, ...]], current: Mapping[str, tuple[int, ...]], what: str = "the reference") -> None:
    """Raise if two ``name -> shape`` maps differ, naming what differs.

    Raises:
        ValueError: for names only in one of them, or a name whose shapes differ.
    """
    missing = [n for n in current if n not in reference]
    extra = [n for n in reference if n not in current]
    if missing or extra:
        raise ValueError(
            f"The model's trainable parameters differ from {what}'s: "
            f"{_names(missing)} not in {what}, {_names(extra)} not in the model. Compare runs of the same "
            "model (the same LightningModule, the same frozen parameters)."
        )
    wrong = [(n, list(reference[n]), list(current[n])) for n in current if tuple(reference[n]) != tuple(current[n])]
    if wrong:
        details = "; ".join(f"{n!r}: {ref} in {what}, {cur} in the model" for n, ref, cur in wrong[:5])
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise ValueError(f"Parameter shapes differ from {what}'s: {details}{more}. Compare runs of the same model configuration.")


def _names(names: list[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:5])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > 5 else ''}]"


# ---- snapshots -------------------------------------------------------------------------------------


def snapshot_path(root: str | Path, step: int) -> Path:
    """The directory of the snapshot after ``step`` optimizer steps under ``root``."""
    return Path(root) / f"step_{step:08d}"


def list_snapshots(root: str | Path) -> dict[int, Path]:
    """``step -> directory`` of every snapshot under ``root`` (empty if ``root`` does not exist)."""
    root = Path(root)
    if not root.is_dir():
        return {}
    found = {}
    for child in root.iterdir():
        match = _SNAPSHOT.match(child.name)
        if match and (child / ".metadata").is_file():
            found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def save_snapshot(weights: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Save ``name -> tensor`` with ``torch.distributed.checkpoint`` (each rank writes its shards).

    A collective when a process group is initialized: every rank must call it.
    """
    state = {name: t.detach() for name, t in weights.items()}
    with _single_process_is_fine():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), overwrite=True), no_dist=not dist.is_initialized())


def snapshot_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``name -> global shape`` of the tensors of a snapshot, read from its metadata."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    return {name: tuple(md.size) for name, md in metadata.state_dict_metadata.items() if hasattr(md, "size")}


def load_snapshot(path: str | Path, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load a snapshot into fresh tensors laid out like ``like`` (sharded like it under FSDP2).

    The tensors are new (``torch.empty_like``): loading into a model's own state dict would write
    into the live weights, which a sharded state dict shares storage with. A collective when a
    process group is initialized.

    Raises:
        ValueError: if the snapshot's names or shapes differ from ``like``'s (naming them).
    """
    check_same_parameters(snapshot_shapes(path), {n: tuple(t.shape) for n, t in like.items()}, what=f"the snapshot {str(path)!r}")
    fresh = {name: torch.empty_like(t.detach()) for name, t in like.items()}
    with _single_process_is_fine():
        dcp.load(fresh, storage_reader=dcp.FileSystemReader(str(path)), no_dist=not dist.is_initialized())
    return fresh


@contextlib.contextmanager
def _single_process_is_fine() -> Iterator[None]:
    """Silence the warning ``torch.distributed.checkpoint`` gives every time it runs without a process group."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# ---- shadow AdamW ----------------------------------------------------------------------------------

#: Hyperparameters a shadow copies from the live optimizer's param group when the group has them.
_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay", "maximize", "amsgrad", "foreach", "fused", "capturable")


class ShadowAdamW:
    """An AdamW copy of an optimizer's parameters, stepped with the live gradients.

    The copy has the live optimizer's param groups, and before every step takes each group's
    current ``lr``, ``betas``, ``eps`` and ``weight_decay`` (so a schedule applies to both), with
    ``overrides`` on top. A parameter without a gradient is skipped, as by the live optimizer.

    Args:
        optimizer: the live optimizer.
        names: ``parameter -> name`` for every parameter of ``optimizer``.
        overrides: AdamW hyperparameters that replace the live group's (e.g. ``{"betas": (0.9, 0.95)}``
            when the live optimizer is not Adam-like).
    """

    def __init__(self, optimizer: Optimizer, names: Mapping[torch.Tensor, str], overrides: Mapping[str, Any] | None = None) -> None:
        self.live = optimizer
        self.overrides = dict(overrides or {})
        self.names = [[names[p] for p in group["params"]] for group in optimizer.param_groups]
        self.weights: dict[str, torch.Tensor] = {}
        groups = []
        for group, group_names in zip(optimizer.param_groups, self.names):
            params = []
            for p, name in zip(group["params"], group_names):
                self.weights[name] = p.detach().clone()
                params.append(self.weights[name])
            groups.append({"params": params, **self._hparams(group)})
        self.optimizer = torch.optim.AdamW(groups)

    def _hparams(self, group: Mapping[str, Any]) -> dict[str, Any]:
        out = {key: group[key] for key in _ADAMW_KEYS if key in group}
        out.update(self.overrides)
        if isinstance(out.get("lr"), torch.Tensor) and not (out.get("fused") or out.get("capturable")):
            out["lr"] = float(out["lr"])
        return out

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step of the copy with the live parameters' current gradients."""
        pairs = []
        for live_group, group in zip(self.live.param_groups, self.optimizer.param_groups):
            group.update(self._hparams(live_group))
            for p, s in zip(live_group["params"], group["params"]):
                s.grad = p.grad
                pairs.append(s)
        self.optimizer.step()
        for s in pairs:
            s.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore weights and AdamW state saved by :meth:`state_dict`.

        Raises:
            ValueError: if the saved weights have other names or shapes.
        """
        saved = state["weights"]
        check_same_parameters({n: tuple(t.shape) for n, t in saved.items()}, {n: tuple(t.shape) for n, t in self.weights.items()}, what="the saved shadow")
        with torch.no_grad():
            for name, tensor in self.weights.items():
                tensor.copy_(saved[name])
        self.optimizer.load_state_dict(state["optimizer"])
