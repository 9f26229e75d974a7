r"""Optimizer-state memory of a model for AdamW, AdamMini, Eve and MicroAdam, without allocating it.

Everything is computed from parameter shapes, so the model may live on the meta device (see
:func:`lightning_lowmem.models.known.build_meta_model`): a 70B model is estimated in about a second.
States are float32 and GB are :math:`10^9` bytes, as in the Adam-mini paper's Table 1. Per-tensor
``step`` counters (4 bytes per tensor) are left out of every row.

=====================  ==================================================================
optimizer              state bytes
=====================  ==================================================================
AdamW                  ``8 N``: ``exp_avg`` and ``exp_avg_sq``, 4 bytes each
AdamMini (preset)      ``4 (N + V)``: ``m`` elementwise, ``V`` second-moment values of the
                       block plan (:meth:`BlockPlan.state_bytes`)
Eve                    the same with the ``eve`` preset (one value per row of linear weights)
AdamMini (adam_mini,   ``m`` stored as bf16 (2 bytes), int8 (1 byte + a 4-byte scale per 128
``<dtype>`` m)         entries of a row) or int4 (0.5 byte + the scales): ``exp_avg_dtype``
                       (:meth:`MomentumFormat.state_bytes`); with int8/int4, tensors of fewer
                       than 2 dims keep fp32 ``m``
MicroAdam              per compressed tensor :meth:`MicroAdamLayout.state_bytes` (row-aligned
                       blocks: about ``0.5 + 4/bucket + 4 m density`` bytes per parameter,
                       0.983 for GPT-2 small at the defaults); 1-D tensors and tensors below
                       ``min_compressed_numel`` keep fp32 AdamW state (8 bytes)
=====================  ==================================================================

``N`` counts a tied weight once. No Lightning inside: the CLI (``lowmem estimate``), the docs and
the benchmarks share these functions.

Adam-mini paper, Table 1
------------------------

The paper (Zhang et al., 2024) gives, "based on float32": GPT2-1.5B 12.48 -> 6.56 GB (47.4%),
TinyLlama-1B 8.80 -> 4.92 GB (44.10%), Llama2-7B 53.92 -> 28.04 GB (48.04%). With the exact
parameter counts and the ``adam_mini_paper`` preset (its Algorithms 2-4) this module gives
12.46 -> 6.56, 8.80 -> 4.92 and 53.91 -> 28.00 GB. How the figures compare (:data:`PAPER_TABLE1`,
:func:`paper_table1_note`; the discussion is in ``docs/cli.md``):

* The paper multiplies a parameter count rounded to three significant digits: 8 B x 1.56e9 =
  12.48, 8 B x 1.10e9 = 8.80, 8 B x 6.74e9 = 53.92 GB, and 4 B x (N + E) for Adam-mini, with ``E``
  the embedding and output parameters of its Table 5 (GPT2: 50304 x 1600, tied, counted once;
  TinyLlama: 32000 x 2048 x 2; Llama2: 32000 x 4096 x 2). That arithmetic reproduces five of the six
  GB figures; the exact counts (1,557,611,200; 1,100,048,384; 6,738,415,616) give 12.46, 8.80,
  53.91 GB for AdamW.
* GPT2-1.5B is nanoGPT's model: vocabulary padded to 50304 (1,557,686,400 parameters, still
  12.46 GB) and the output head tied to ``wte``; untied it would be 13.1 GB. Its reference code
  gave the position embedding ``wpe`` one value (only ``wte`` matched its name list); this
  package's preset keeps every ``nn.Embedding`` elementwise, ``wpe`` included (+6.6 MB: 6.56 GB
  here, 6.55 GB with ``wpe`` in one block).
* Llama2-7B's 28.04 GB follows from no count consistent with 53.92 GB: the same arithmetic gives
  28.01 GB, and 28.04 GB would need 7 to 11 million more fp32 values than its embedding and output
  layers hold.
* The percentages do not follow one rule: 47.4% = 1 - 6.56/12.48; 44.10% = (1 - 11.80%)/2 with
  Table 5's embedding share of TinyLlama (exactly 11.92%, hence 44.04% here); 48.04% follows
  neither from its own figures (28.04/53.92 saves 48.00%) nor from the exact count (48.05%).

Example::

    >>> from lightning_lowmem.models.known import build_meta_model
    >>> rows = estimate_state_memory(build_meta_model("llama2-7b"))
    >>> [(r.label, f"{r.state_gb:.2f}") for r in rows][:3]
    [('AdamW', '53.91'), ('AdamMini (adam_mini)', '26.96'), ('AdamMini (adam_mini_paper)', '28.00')]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from torch import nn

from lightning_lowmem.optim.adam_mini import ADAM_MINI_PRESETS
from lightning_lowmem.optim.micro_adam import MicroAdam
from lightning_lowmem.kernels.momentum_formats import MomentumFormat
from lightning_lowmem.partition import ADAMW_STATE_BYTES_PER_PARAM, BlockPlan, build_plan

#: Bytes of one fp32 state value.
FP32_BYTES = 4


@dataclasses.dataclass(frozen=True)
class StateEstimate:
    """The fp32 optimizer state one optimizer would hold for a model.

    Args:
        optimizer: ``"AdamW"``, ``"AdamMini"``, ``"Eve"`` or ``"MicroAdam"``.
        variant: the block preset (AdamMini), or the compression settings (MicroAdam); ``None`` else.
        num_params: parameters updated (a tied weight once).
        state_bytes: bytes of state (``step`` counters excluded).
    """

    optimizer: str
    variant: str | None
    num_params: int
    state_bytes: int

    @property
    def label(self) -> str:
        """``"AdamMini (adam_mini_paper)"``, ``"AdamW"``, ..."""
        return f"{self.optimizer} ({self.variant})" if self.variant else self.optimizer

    @property
    def state_gb(self) -> float:
        """State in GB of 1e9 bytes."""
        return self.state_bytes / 1e9

    @property
    def bytes_per_param(self) -> float:
        return self.state_bytes / self.num_params if self.num_params else 0.0

    @property
    def adamw_bytes(self) -> int:
        """fp32 AdamW's state for the same parameters."""
        return ADAMW_STATE_BYTES_PER_PARAM * self.num_params

    @property
    def saving_percent(self) -> float:
        """Percent of fp32 AdamW's state saved (negative if larger)."""
        return 100.0 * (1.0 - self.state_bytes / self.adamw_bytes) if self.adamw_bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The fields and derived numbers, for JSON."""
        return dict(
            optimizer=self.optimizer,
            variant=self.variant,
            label=self.label,
            num_params=self.num_params,
            state_bytes=self.state_bytes,
            state_gb=self.state_gb,
            bytes_per_param=self.bytes_per_param,
            saving_percent=self.saving_percent,
        )


def estimate_state_memory(
    model: nn.Module,
    *,
    adam_mini_presets: Sequence[str] = ADAM_MINI_PRESETS,
    rules: Any = None,
    micro_adam: Mapping[str, Any] | None = None,
    exp_avg_dtypes: Sequence[str] = ("bf16", "int8", "int4"),
) -> list[StateEstimate]:
    """fp32 state bytes of AdamW, AdamMini (each preset), Eve and MicroAdam for ``model``.

    Only shapes are read: build the model on the meta device. AdamMini and Eve use the same
    :func:`~lightning_lowmem.partition.build_plan` the optimizers build; MicroAdam uses the
    optimizer's own layout rules (which tensors are compressed, and how).

    Args:
        model: any ``nn.Module``; its trainable parameters are counted, a tied weight once.
        adam_mini_presets: the AdamMini presets to estimate, one row each.
        rules: block rules for AdamMini and Eve (as :func:`~lightning_lowmem.partition.build_plan`).
        micro_adam: MicroAdam settings (``window``, ``density``, ``block_size``, ``quant_bucket``,
            ``min_compressed_numel``); its defaults where not given.
        exp_avg_dtypes: the momentum formats of AdamMini (first preset) to estimate, one row each.

    Returns:
        Rows in the order AdamW, AdamMini (each preset), Eve, AdamMini (each momentum format), MicroAdam.

    Raises:
        ValueError: for an unknown preset, a rule that does not fit, a MicroAdam setting out of
            range, or a model without trainable parameters.
    """
    plans = {preset: build_plan(model, preset, rules) for preset in (*adam_mini_presets, "eve")}
    num_params = next(iter(plans.values())).num_params
    if num_params == 0:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters: there is no optimizer state to estimate."
        )
    rows = [StateEstimate("AdamW", None, num_params, ADAMW_STATE_BYTES_PER_PARAM * num_params)]
    rows += [
        StateEstimate("AdamMini", preset, num_params, plans[preset].state_bytes(FP32_BYTES))
        for preset in adam_mini_presets
    ]
    rows.append(StateEstimate("Eve", None, num_params, plans["eve"].state_bytes(FP32_BYTES)))
    if adam_mini_presets:
        preset = adam_mini_presets[0]
        rows += [StateEstimate("AdamMini", f"{preset}, {name} m", num_params,
                               quantized_state_bytes(plans[preset], MomentumFormat.of(name)))
                 for name in exp_avg_dtypes]
    rows.append(micro_adam_estimate(model, **dict(micro_adam or {})))
    return rows


def quantized_state_bytes(plan: BlockPlan, fmt: MomentumFormat) -> int:
    """Bytes of AdamMini/Eve state with momentum stored in ``fmt``: fp32 ``v`` of ``plan``, and
    ``fmt``'s codes and scales for every tensor it applies to (fp32 ``m`` for the others)."""
    total = 0
    for name in plan:
        entry = plan[name]
        stored = not fmt.quantized or (len(entry.shape) >= 2 and (entry.bank_dims == 0 or entry.is_full))
        momentum = fmt.state_bytes(entry.shape) if stored else FP32_BYTES * entry.numel
        total += momentum + FP32_BYTES * entry.state_numel
    return total


def micro_adam_estimate(model: nn.Module, **settings: Any) -> StateEstimate:
    """MicroAdam's state for ``model`` (its defaults unless ``settings`` say otherwise).

    A :class:`~lightning_lowmem.optim.MicroAdam` is built over the (meta) parameters to apply its own
    rules: a tensor of two or more dims and at least ``min_compressed_numel`` elements holds the
    compressed window and error feedback (:meth:`MicroAdam.layout_of` ... ``.state_bytes(window, error_feedback)``),
    any other fp32 ``exp_avg``/``exp_avg_sq``. Nothing is allocated.
    """
    optimizer = MicroAdam(model, **settings)
    state_bytes = num_params = 0
    for _, param, group in optimizer.named_params():
        numel = param.numel()
        num_params += numel
        if optimizer.is_compressed(param, group):
            state_bytes += optimizer.layout_of(param, group).state_bytes(group["window"], group["error_feedback"])
        else:
            state_bytes += ADAMW_STATE_BYTES_PER_PARAM * numel
    group = optimizer.param_groups[0]
    variant = f"window {group['window']}, density {group['density']:g}"
    if not group["error_feedback"]:
        variant += ", no error feedback"
    return StateEstimate("MicroAdam", variant, num_params, state_bytes)


# ------------------------------------------------------------------------------------------------
# Adam-mini paper, Table 1


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One model of the Adam-mini paper's Table 1 and the numbers its arithmetic used.

    Args:
        model: the paper's name for the model.
        adamw_gb: AdamW state, GB, as printed.
        adam_mini_gb: Adam-mini state, GB, as printed.
        saving: the saving as printed.
        rounded_params: the parameter count the paper multiplied (three significant digits).
        embedding_params: embedding + output parameters (elementwise ``v``), from its Table 5.
        remark: what explains the remaining differences.
    """

    model: str
    adamw_gb: float
    adam_mini_gb: float
    saving: str
    rounded_params: float
    embedding_params: int
    remark: str

    def paper_arithmetic(self) -> tuple[float, float]:
        """``(8 N, 4 (N + E))`` in GB with the paper's rounded ``N`` and Table 5's ``E``."""
        n, e = self.rounded_params, self.embedding_params
        return ADAMW_STATE_BYTES_PER_PARAM * n / 1e9, FP32_BYTES * (n + e) / 1e9

    def as_dict(self) -> dict[str, Any]:
        adamw, mini = self.paper_arithmetic()
        return dict(dataclasses.asdict(self), paper_arithmetic_gb=dict(adamw=adamw, adam_mini=mini))


#: Table 1 of the Adam-mini paper, by the known model name it was computed for.
PAPER_TABLE1: Mapping[str, PaperRow] = MappingProxyType(
    {
        "gpt2-xl": PaperRow(
            "GPT2-1.5B", 12.48, 6.56, "47.4%", 1.56e9, 50304 * 1600,
            "GPT2-1.5B is nanoGPT's: vocabulary padded to 50304 (1,557,686,400 parameters, 12.46 GB), output "
            "head tied to wte and counted once (untied: 13.1 GB). wpe elementwise here (+6.6 MB); 6.55 GB with "
            "rules {'wpe': 'tensor'}.",
        ),
        "tinyllama-1b": PaperRow(
            "TinyLlama-1B", 8.80, 4.92, "44.10%", 1.10e9, 32000 * 2048 * 2,
            "Embedding share: 11.80% in the paper's Table 5, 11.92% exact (131,072,000 / 1,100,048,384); "
            "(1 - 11.80%)/2 = 44.10%, (1 - 11.92%)/2 = 44.04%.",
        ),
        "llama2-7b": PaperRow(
            "Llama2-7B", 53.92, 28.04, "48.04%", 6.74e9, 32000 * 4096 * 2,
            "The paper's arithmetic gives 28.01 GB; 28.04 GB is 7 to 11 million fp32 values more than the "
            "embedding and output layers hold. Saving: 48.00% from 28.04/53.92, 48.05% from the exact count.",
        ),
    }
)

#: The preset that implements the paper's Algorithms 2-4, which Table 1 is computed for.
PAPER_PRESET = "adam_mini_paper"


def paper_table1_note(name: str, rows: Sequence[StateEstimate]) -> list[str]:
    """Lines comparing ``rows`` (from :func:`estimate_state_memory`) with Table 1, or ``[]``.

    Args:
        name: a key of :data:`PAPER_TABLE1` (a known model name); other names give ``[]``.
        rows: the estimates; they must include AdamW and AdamMini with the ``adam_mini_paper`` preset.
    """
    paper = PAPER_TABLE1.get(name)
    by_label = {row.label: row for row in rows}
    adamw, mini = by_label.get("AdamW"), by_label.get(f"AdamMini ({PAPER_PRESET})")
    if paper is None or adamw is None or mini is None:
        return []
    arith_adamw, arith_mini = paper.paper_arithmetic()
    pairs = (("AdamW", arith_adamw, paper.adamw_gb), ("Adam-mini", arith_mini, paper.adam_mini_gb))
    verdicts = [
        f"{label} as printed" if _gb(ours) == _gb(printed) else f"the paper prints {_gb(printed)} for {label}"
        for label, ours, printed in pairs
    ]
    verdict = "both as printed" if all(v.endswith("as printed") for v in verdicts) else "; ".join(verdicts)
    return [
        f"Adam-mini paper, Table 1 ({paper.model}, float32): AdamW {_gb(paper.adamw_gb)} GB -> "
        f"Adam-mini {_gb(paper.adam_mini_gb)} GB ({paper.saving}).",
        f"Here, exact count {adamw.num_params:,}, {PAPER_PRESET} preset: {_gb(adamw.state_gb)} GB -> "
        f"{_gb(mini.state_gb)} GB ({mini.saving_percent:.2f}%).",
        f"The paper's arithmetic, 8 B x N and 4 B x (N + E) with N rounded to {paper.rounded_params / 1e9:.2f}e9 and "
        f"E = {paper.embedding_params:,} embedding + output parameters (its Table 5): "
        f"{_gb(arith_adamw)} GB -> {_gb(arith_mini)} GB ({verdict}).",
        paper.remark,
    ]


def _gb(value: float) -> str:
    return f"{value:.2f}"
