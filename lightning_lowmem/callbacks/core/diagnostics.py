r"""Optimizer diagnostics: effective learning rates and update-to-weight ratios (no Lightning inside).

*Relative learning rate* of a second-moment block :math:`b` after step :math:`t`: its effective
learning rate :math:`\eta / (\sqrt{\hat v_b} + \epsilon)` divided by the configured (scheduled)
learning rate :math:`\eta`,

.. math::

    \rho_b = \frac{1}{\sqrt{\hat v_b} + \epsilon}, \qquad \hat v_b = \frac{v_b}{1 - \beta_2^t},

the factor by which the block's momentum is multiplied before the ``lr``: about :math:`1/|g|` for a
block of gradients of size :math:`|g|`, :math:`1/\epsilon` for a block that has had no gradient. It
is read from the state key ``exp_avg_sq`` (one entry per block for AdamMini/Eve, one per element for
AdamW and ``full`` blocks; parameters without it, such as MicroAdam's compressed ones, have none).
Its spread covers orders of magnitude, so the charts give :math:`\log_{10} \rho_b`.
Blocks are sampled (at most ``max_samples`` per kind and rank, with a fixed generator) so that
quantiles and histograms cost the same for any model size.

*Update-to-weight ratio* of a group of parameters: :math:`\lVert w_{t} - w_{t-1}\rVert_2 /
\lVert w_{t-1}\rVert_2`, summed over the group's tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch.optim import Optimizer

from lightning_lowmem.callbacks.core.kinds import kinds_present, state_segments
from lightning_lowmem.callbacks.core.reduce import gather_over_mesh, mesh_of, owned_part, sum_over_mesh

_INDEX = re.compile(r"^\d+$")


def layer_group(name: str) -> str:
    """The layer group of a parameter: its name up to the first numeric part, else its module.

    ``transformer.h.3.attn.c_attn.weight`` -> ``transformer.h.3``; ``transformer.wte.weight`` ->
    ``transformer.wte``; ``bias`` -> ``bias``.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if _INDEX.match(part):
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def relative_lr_samples(
    optimizers: Sequence[Optimizer],
    max_samples: int = 4096,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``kind -> relative learning rates`` of sampled blocks of every rank (float64, on the CPU).

    Every rank samples up to ``max_samples`` blocks per kind from the state it owns (shards, and
    replicated state on the mesh's first rank); under FSDP2 the samples of all ranks are gathered in
    one collective, which every rank must call. Kinds without ``exp_avg_sq`` (MicroAdam's
    ``compressed``) are absent.
    """
    per_kind: dict[str, list[tuple[torch.Tensor, float, float]]] = {}
    # Every rank must agree on the kinds (the gather's size): take them from the state all ranks have,
    # not from the part a rank owns (replicated blocks are owned by the first rank only).
    all_kinds: list[str] = []
    mesh = None
    for optimizer in optimizers:
        segments = state_segments(optimizer)
        mesh = mesh or mesh_of(p for group in optimizer.param_groups for p in group["params"])
        for group in optimizer.param_groups:
            _, beta2 = group.get("betas", (None, None))
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                v, step = state.get("exp_avg_sq"), state.get("step")
                if v is None or step is None or beta2 is None:
                    continue
                segs = segments[p]
                all_kinds.extend(s.kind for s in segs)
                own = owned_part(v, mesh)
                if own is None:
                    continue
                t = float(step)
                hparams = (1.0 / (1.0 - beta2**t) if t > 0 else 1.0, float(group["eps"]))
                own, offset = own.detach().reshape(-1), 0
                if len(segs) == 1:
                    per_kind.setdefault(segs[0].kind, []).append((own, *hparams))
                    continue
                # a fused parameter's blocks span ranks, so its state is replicated: the full vector is here
                for seg in segs:
                    per_kind.setdefault(seg.kind, []).append((own[offset : offset + seg.entries], *hparams))
                    offset += seg.entries
    generator = torch.Generator().manual_seed(seed)
    order = kinds_present(all_kinds)
    local = {k: _sample_relative_lr(per_kind.get(k, []), max_samples, generator) for k in order}
    if mesh is None:
        return local
    # Every rank must agree on the kinds and the buffer size: kinds come from global plans, but a
    # rank may hold no entries of one; pad with NaN.
    padded = torch.full((len(order), max_samples), math.nan, dtype=torch.float64)
    for i, k in enumerate(order):
        padded[i, : local[k].numel()] = local[k]
    gathered = gather_over_mesh(padded, mesh)
    out = {}
    for i, k in enumerate(order):
        values = gathered[:, i, :].reshape(-1)
        out[k] = values[~torch.isnan(values)]
    return out


def _sample_relative_lr(
    entries: list[tuple[torch.Tensor, float, float]], max_samples: int, generator: torch.Generator
) -> torch.Tensor:
    total = sum(v.numel() for v, *_ in entries)
    out = []
    for v, scale, eps in entries:
        if v.numel() == 0:
            continue
        if total > max_samples:
            take = max(1, round(max_samples * v.numel() / total))
            index = torch.randint(v.numel(), (take,), generator=generator).to(v.device)
            v = v[index]
        v_hat = v.to(torch.float64).cpu() * scale
        out.append(1.0 / (v_hat.sqrt() + eps))
    values = torch.cat(out) if out else torch.empty(0, dtype=torch.float64)
    return values[:max_samples]


def weights_by_group(
    named: Mapping[str, torch.Tensor], group_of: Callable[[str], str]
) -> tuple[dict[str, list[torch.Tensor]], object | None]:
    """Each group's own (local) parts of the weights, cloned, and the mesh the sums will run over."""
    mesh = mesh_of(named.values())
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in named.items():
        own = owned_part(p.detach(), mesh)
        groups.setdefault(group_of(name), []).append(own.clone() if own is not None else None)
    return groups, mesh


def update_ratios(
    before: Mapping[str, list[torch.Tensor | None]],
    named: Mapping[str, torch.Tensor],
    group_of: Callable[[str], str],
    mesh: object | None,
) -> dict[str, float]:
    """``group -> ||w - w_before|| / ||w_before||`` for the weights ``named`` now hold (one all-reduce under FSDP2)."""
    groups = list(before)
    index = {g: i for i, g in enumerate(groups)}
    position = dict.fromkeys(groups, 0)
    device = next(iter(named.values())).device
    sums = torch.zeros(2, len(groups), dtype=torch.float64, device=device)
    for name, p in named.items():
        g = group_of(name)
        old = before[g][position[g]]
        position[g] += 1
        if old is None:
            continue
        own = owned_part(p.detach(), mesh)
        sums[0, index[g]] += torch.linalg.vector_norm(own.to(torch.float64) - old.to(torch.float64)).square()
        sums[1, index[g]] += torch.linalg.vector_norm(old, dtype=torch.float64).square()
    sums = sum_over_mesh(sums, mesh).cpu().tolist()
    return {g: (math.sqrt(sums[0][i]) / math.sqrt(sums[1][i]) if sums[1][i] > 0 else 0.0) for g, i in index.items()}


def quantile_names(quantiles: Sequence[float]) -> list[str]:
    """Tag suffixes of quantiles: ``0.01 -> "p01"``, ``0.5 -> "p50"``, ``0.999 -> "p99.9"``."""
    return [f"p{100 * q:02.0f}" if float(100 * q).is_integer() else f"p{100 * q:g}" for q in quantiles]


def quantiles_of(values: torch.Tensor, quantiles: Sequence[float]) -> list[float]:
    """The ``quantiles`` of ``values`` (linear interpolation); NaN for an empty tensor."""
    if values.numel() == 0:
        return [math.nan] * len(quantiles)
    return torch.quantile(values.to(torch.float64), torch.tensor(list(quantiles), dtype=torch.float64)).tolist()

