"""Build a :class:`BlockPlan` for a model: structure -> roles -> preset specs, overridden by rules.

Two entry points:

- :func:`build_plan` reads the model's *structure* (see :mod:`~lightning_lowmem.partition.structure`).
  Prefer it: which module owns a weight, and that module's class, head counts and siblings, are facts;
  a name substring is a guess (``"attn"`` in a name does not make a weight a query projection, and a
  name cannot say that GPT-2's ``Conv1D`` stores its weight transposed).
- :func:`build_plan_from_named_parameters` has only names and global shapes (e.g. a checkpoint's
  index, or a model that cannot be instantiated) and falls back to name substrings.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_lowmem.partition.plan import BlockPlan
from lightning_lowmem.partition.presets import PRESET_TABLES, Preset
from lightning_lowmem.partition.spec import BlockSpec, ParamBlocks
from lightning_lowmem.partition.structure import ParamInfo, Part, describe_parameters

#: Names of the presets :func:`build_plan` accepts.
PRESETS = tuple(PRESET_TABLES)

#: ``{regex: spec}`` or ``[(regex, spec), ...]`` (a regex may be pre-compiled); a spec is anything
#: :meth:`BlockSpec.parse` reads, or a pattern ``{"segments": [(spec, rows), ...], "repeat": n}``.
Rules = Mapping[str, Any] | Sequence[tuple[str, Any]]

_NAMES_SHOWN = 5


@dataclasses.dataclass(frozen=True)
class Rule:
    """A user rule: parameters whose name (or an alias) ``re.search``-matches ``pattern`` get
    ``segments`` (one period of rows, ``None`` rows for "all of them") repeated ``repeat`` times."""

    pattern: str
    regex: re.Pattern[str]
    segments: tuple[tuple[BlockSpec, int | None], ...]
    repeat: int = 1

    @property
    def spec(self) -> BlockSpec | dict[str, Any]:
        """The rule's spec as written: a :class:`BlockSpec`, or a pattern in its canonical mapping form."""
        if self.segments[0][1] is None:
            return self.segments[0][0]
        return {"segments": [[str(spec), rows] for spec, rows in self.segments], "repeat": self.repeat}

    def __str__(self) -> str:
        if self.segments[0][1] is None:
            return str(self.segments[0][0])
        period = ", ".join(f"{spec}x{rows}" for spec, rows in self.segments)
        return f"[{period}] x {self.repeat}"

    def matches(self, info: ParamInfo) -> bool:
        """Whether the rule matches the parameter's name or one of its aliases."""
        return any(self.regex.search(name) for name in (info.name, *info.aliases))


def build_plan(
    model: nn.Module, preset: str = "adam_mini", rules: Rules | None = None, *, include_frozen: bool = False
) -> BlockPlan:
    """Decide the second-moment blocks of every trainable parameter of ``model``.

    Each parameter gets a role from the model's structure (attention Q/K/V, fused QKV, MLP, embedding,
    output head, norm, bias, ...), the preset maps the role to a block kind, and the first user rule
    whose regex matches the parameter's name (or a tied alias) replaces the preset's choice for the
    whole parameter. Only global shapes are read: the model may be on the meta device or sharded with
    FSDP2. Frozen parameters get no entry unless ``include_frozen`` (an optimizer planning a layer it
    will train once unfrozen); a tied weight gets one entry, its other names are aliases.

    Parameters the structure does not explain (role ``"other"``, or a fused projection whose head counts
    do not fit) get the preset's fallback and are named together in one ``UserWarning``.

    Args:
        model: the model (any ``nn.Module``).
        preset: one of :data:`PRESETS`: ``"adam_mini"`` (the reference implementation v1.1),
            ``"adam_mini_paper"`` (the paper's Algorithms 2-4) or ``"eve"``.
        rules: ``{regex: spec}`` or ``[(regex, spec), ...]``, tried in order; a spec is
            ``"full"``, ``"row"``, ``"tensor"``, ``"head:<head_dim>"``, a mapping or a :class:`BlockSpec`.
        include_frozen: plan parameters with ``requires_grad=False`` too.

    Returns:
        The :class:`BlockPlan`, titled with the preset's name.

    Raises:
        ValueError: for an unknown preset, a rule that is not a valid regex or spec, a rule that
            matches no trainable parameter, or a ``head`` rule whose ``head_dim`` does not divide
            the rows of a parameter it matches.

    Example::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> with torch.device("meta"):                      # shapes only, no memory
        ...     model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4))
        >>> plan = build_plan(model, preset="adam_mini", rules={r"\\.wpe\\.": "full"})
        >>> print(plan)                 # blocks, parameters and state bytes per kind vs AdamW
        >>> [str(spec) for spec, rows in plan["transformer.h.0.attn.c_attn.weight"].segments]
        ['head:16', 'head:16', 'row']
        >>> plan["lm_head.weight"].role    # tied to transformer.wte.weight: one entry
        'tied_embedding'
    """
    table = get_preset(preset)
    compiled = compile_rules(rules)
    infos = describe_parameters(model, include_frozen=include_frozen)
    frozen = [] if include_frozen else [name for name, param in model.named_parameters() if not param.requires_grad]
    plan, fallbacks = _assemble(infos, table, compiled, frozen)
    if fallbacks:
        warnings.warn(_fallback_message(fallbacks, "build_plan"), UserWarning, stacklevel=2)
    return plan


def build_plan_from_named_parameters(
    named_parameters: Iterable[tuple[str, Any]] | Mapping[str, Any],
    preset: str = "adam_mini",
    rules: Rules | None = None,
    head_dim: int | None = None,
) -> BlockPlan:
    """Build a plan from names and global shapes only, by name substrings (the fallback).

    Prefer :func:`build_plan`: it reads what each weight *is* from the module that owns it, while
    names only suggest it (a substring such as ``"attn"`` or ``"q."`` matches unrelated layers, the
    head count is not in a name, and a name cannot tell that GPT-2's ``Conv1D`` weights are stored
    ``[in, out]``). Use this when there is no module: a checkpoint index, a sharded state dict.

    Roles, first match wins (``owner`` is the name's second-to-last component):

    - name ends with ``bias`` -> ``bias``; contains ``norm``/``ln_``/``layernorm`` -> ``norm``;
    - owner ``lm_head``/``embed_out`` or name ``[...].output.weight`` -> ``output``;
    - contains ``embed``/``wte``/``wpe``/``tok_embeddings`` -> ``embedding`` (``tied_embedding`` when
      the same tensor also comes under an output name);
    - owner ``c_attn``/``qkv``/``Wqkv``/``qkv_proj`` or ``in_proj_weight`` -> ``qkv`` in equal thirds
      when ``head_dim`` divides each third (a ``[E, 3E]`` weight is read as GPT-2's transposed
      layout), else a plain ``linear`` weight;
    - owner ``q_proj``/``wq``/``query``/``q`` -> ``query``, ``k_proj``/``wk``/``key``/``k`` -> ``key``
      (``head:<head_dim>`` when ``head_dim`` is given and divides the rows, else ``row``),
      ``v_proj``/``wv``/``value``/``v`` -> ``value``;
    - any other 2-D tensor -> ``linear``; anything else -> ``other`` (warned about, as in
      :func:`build_plan`).

    Args:
        named_parameters: ``(name, tensor or shape)`` pairs or a mapping, e.g.
            ``model.named_parameters()`` or ``{name: torch.Size(...)}``. An ``nn.Parameter`` with
            ``requires_grad=False`` is left out; the same tensor under two names is one entry.
        preset: as in :func:`build_plan`.
        rules: as in :func:`build_plan`.
        head_dim: rows per attention head, used for query/key/fused QKV weights.

    Returns:
        The :class:`BlockPlan`.

    Raises:
        ValueError: as :func:`build_plan`, and for a ``head_dim`` that is not a positive integer.
    """
    if head_dim is not None and _positive(head_dim) is None:
        raise ValueError(f"head_dim must be a positive integer or None, got {head_dim!r}.")
    table = get_preset(preset)
    compiled = compile_rules(rules)
    infos, frozen = _describe_by_name(named_parameters, head_dim)
    plan, fallbacks = _assemble(infos, table, compiled, frozen)
    if fallbacks:
        warnings.warn(_fallback_message(fallbacks, "build_plan_from_named_parameters"), UserWarning, stacklevel=2)
    return plan


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        ValueError: naming the available presets when ``name`` is not one.
    """
    if not isinstance(name, str) or name not in PRESET_TABLES:
        raise ValueError(f"Unknown block preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESET_TABLES[name]


def compile_rules(rules: Rules | None) -> list[Rule]:
    """Parse user rules into :class:`Rule` objects, in order.

    Raises:
        ValueError: if ``rules`` has the wrong shape, a pattern is not a valid regex, or a spec
            cannot be parsed; the message names the rule.
    """
    if rules is None:
        return []
    if isinstance(rules, Mapping):
        pairs = list(rules.items())
    elif isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
        raise ValueError(f"rules must be a mapping {{regex: spec}} or a list of (regex, spec) pairs, got {rules!r}.")
    else:
        pairs = list(rules)
    compiled = []
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"Each rule must be a (regex, spec) pair, got {pair!r}.")
        pattern, spec = pair
        if isinstance(pattern, re.Pattern) and isinstance(pattern.pattern, str):
            regex, pattern = pattern, pattern.pattern  # keeps the compiled flags
        elif isinstance(pattern, str):
            try:
                regex = re.compile(pattern)
            except re.error as err:
                raise ValueError(
                    f"Rule {_show(pattern)} is not a valid regular expression ({err}); fix or escape it."
                ) from None
        else:
            raise ValueError(
                f"A rule's pattern must be a regex string, got {pattern!r} of type {type(pattern).__name__}."
            )
        try:
            segments, repeat = _parse_rule_spec(spec)
        except ValueError as err:
            raise ValueError(f"Rule {_show(pattern)}: {err}") from None
        compiled.append(Rule(pattern, regex, segments, repeat))
    return compiled


def _parse_rule_spec(value: Any) -> tuple[tuple[tuple[BlockSpec, int | None], ...], int]:
    """A spec over all rows, or a pattern ``{"segments": [(spec, rows), ...], "repeat": n}``."""
    if not (isinstance(value, Mapping) and "segments" in value):
        return ((BlockSpec.parse(value), None),), 1
    unknown = set(value) - {"segments", "repeat"}
    repeat = value.get("repeat", 1)
    if unknown or not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
        raise ValueError(
            f"A pattern takes 'segments' (a list of (spec, rows) pairs) and a positive int 'repeat', got {dict(value)}."
        )
    segments = []
    for pair in value["segments"]:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[1], int) or pair[1] < 1:
            raise ValueError(f"Each segment of a pattern is a (spec, rows) pair with rows >= 1, got {pair!r}.")
        segments.append((BlockSpec.parse(pair[0]), pair[1]))
    if not segments:
        raise ValueError("A pattern needs at least one segment.")
    return tuple(segments), repeat


def _assemble(
    infos: list[ParamInfo], preset: Preset, rules: list[Rule], frozen: list[str]
) -> tuple[BlockPlan, list[tuple[ParamInfo, ParamBlocks]]]:
    """Entries for ``infos`` under ``preset`` and ``rules``; also the fallback entries to warn about."""
    entries, fallbacks = [], []
    used: set[int] = set()
    for info in infos:
        matching = [i for i, rule in enumerate(rules) if rule.matches(info)]
        used.update(matching)
        if matching:
            entries.append(_from_rule(info, rules[matching[0]]))
            continue
        entry = ParamBlocks(
            info.name, info.shape, preset.segments(info), transposed=info.transposed, role=info.role,
            aliases=info.aliases, repeat=info.repeat, bank_dims=info.bank_dims,
        )
        entries.append(entry)
        if info.fallback is not None:
            fallbacks.append((info, entry))
    for i, rule in enumerate(rules):
        if i not in used:
            raise ValueError(_unused_rule_message(rule, infos, frozen))
    return BlockPlan(entries, preset=preset.name), fallbacks


def _show(pattern: str) -> str:
    """A pattern as the user would have written it: ``r'h\\.0'`` rather than ``'h\\\\.0'``."""
    return f"r'{pattern}'" if "\\" in pattern and "'" not in pattern else repr(pattern)


def _from_rule(info: ParamInfo, rule: Rule) -> ParamBlocks:
    """The rule's segments over the parameter's rows, per bank (expert); the role is kept."""
    try:
        if rule.segments[0][1] is None:
            return ParamBlocks.single(
                info.name, info.shape, rule.segments[0][0], transposed=info.transposed, role=info.role,
                aliases=info.aliases, bank_dims=info.bank_dims,
            )
        return ParamBlocks(
            info.name, info.shape, rule.segments, transposed=info.transposed, role=info.role, aliases=info.aliases,
            repeat=rule.repeat, bank_dims=info.bank_dims,
        )
    except ValueError as err:
        raise ValueError(
            f"Rule {_show(rule.pattern)} -> {rule} does not fit {err} "
            "Give that rule a head_dim that divides the rows, or a regex that leaves this parameter out."
        ) from None


def _unused_rule_message(rule: Rule, infos: list[ParamInfo], frozen: list[str]) -> str:
    """Why a rule is an error: it matches nothing trainable; show what names look like."""
    names = [info.name for info in infos]
    shown = ", ".join(repr(n) for n in names[:_NAMES_SHOWN]) + (", ..." if len(names) > _NAMES_SHOWN else "")
    frozen_hits = [n for n in frozen if rule.regex.search(n)]
    why = (
        f" (it only matches frozen parameters, which have no blocks: {frozen_hits[:_NAMES_SHOWN]})"
        if frozen_hits
        else ""
    )
    return (
        f"Rule {_show(rule.pattern)} matches no trainable parameter{why}. Rules are matched with re.search "
        f"against names such as {shown}; fix the regex or drop the rule."
    )


def _fallback_message(fallbacks: list[tuple[ParamInfo, ParamBlocks]], caller: str) -> str:
    """One message naming every parameter that got a fallback spec, and how to silence it."""
    lines = [
        f"  {info.name} {list(info.shape)} -> {_describe_blocks(entry)}: {info.fallback}" for info, entry in fallbacks
    ]
    example = re.escape(fallbacks[0][0].name)
    return (
        f"{caller}: {len(fallbacks)} parameter(s) were not understood for sure and use the preset's fallback "
        "blocks:\n"
        + "\n".join(lines)
        + f"\nGive them a rule to choose their blocks and silence this warning, e.g. "
        f"rules={{r'^{example}$': 'tensor'}}."
    )


def _describe_blocks(entry: ParamBlocks) -> str:
    """``row``, ``[head:64|head:64|row] x32``, ``row per slice of [8]``: what a parameter got, for the warning."""
    text = "|".join(str(s) for s, _ in entry.segments)
    if entry.repeat > 1:
        text = f"[{text}] x {entry.repeat}"
    if entry.bank_dims and not entry.is_full:
        text += f" per slice of {list(entry.shape[: entry.bank_dims])}"
    return text


# ------------------------------------------------------------------------------------------------
# Name-only fallback


_OUTPUT_OWNERS = frozenset({"lm_head", "embed_out"})
_EMBEDDING_SUBSTRINGS = ("embed", "wte", "wpe", "tok_embeddings")
_NORM_SUBSTRINGS = ("norm", "ln_", "layernorm")
_FUSED_OWNERS = frozenset({"c_attn", "qkv", "wqkv", "qkv_proj"})
_QUERY_OWNERS = frozenset({"q_proj", "wq", "query", "q"})
_KEY_OWNERS = frozenset({"k_proj", "wk", "key", "k"})
_VALUE_OWNERS = frozenset({"v_proj", "wv", "value", "v"})


def _positive(value: Any) -> int | None:
    """``value`` if it is a positive int (not a bool), else ``None``."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _describe_by_name(
    named_parameters: Iterable[tuple[str, Any]] | Mapping[str, Any], head_dim: int | None
) -> tuple[list[ParamInfo], list[str]]:
    """Describe ``(name, tensor or shape)`` pairs by name; also return the frozen names."""
    items = named_parameters.items() if isinstance(named_parameters, Mapping) else named_parameters
    groups: dict[int | str, list[tuple[str, tuple[int, ...]]]] = {}
    frozen = []
    for name, value in items:
        if isinstance(value, nn.Parameter) and not value.requires_grad:
            frozen.append(name)
            continue
        shape = tuple(int(s) for s in (value.shape if hasattr(value, "shape") else value))
        key: int | str = id(value) if isinstance(value, torch.Tensor) else name
        groups.setdefault(key, []).append((name, shape))
    infos = []
    for members in groups.values():
        (name, shape), aliases = members[0], tuple(n for n, _ in members[1:])
        info = _name_role(name, shape, head_dim)
        if aliases and info.role in ("embedding", "output"):
            roles = {info.role} | {_name_role(a, shape, head_dim).role for a in aliases}
            if {"embedding", "output"} <= roles:
                info = ParamInfo(name, shape, "tied_embedding")
        infos.append(dataclasses.replace(info, aliases=aliases))
    return infos, frozen


def _name_role(name: str, shape: tuple[int, ...], head_dim: int | None) -> ParamInfo:
    """Role of one parameter from its name (see :func:`build_plan_from_named_parameters`)."""
    parts = name.split(".")
    owner = parts[-2].lower() if len(parts) > 1 else ""
    lower = name.lower()
    if lower.endswith("bias"):
        return ParamInfo(name, shape, "bias")
    if any(s in lower for s in _NORM_SUBSTRINGS):
        return ParamInfo(name, shape, "norm")
    if owner in _OUTPUT_OWNERS or name == "output.weight" or name.endswith(".output.weight"):
        return ParamInfo(name, shape, "output")
    if any(s in lower for s in _EMBEDDING_SUBSTRINGS):
        return ParamInfo(name, shape, "embedding")
    if len(shape) == 2 and (owner in _FUSED_OWNERS or parts[-1] == "in_proj_weight"):
        return _fused_by_name(name, shape, head_dim)
    if len(shape) == 2 and owner in _QUERY_OWNERS | _KEY_OWNERS:
        role = "query" if owner in _QUERY_OWNERS else "key"
        fits = head_dim is not None and shape[0] % head_dim == 0
        return ParamInfo(name, shape, role, head_dim=head_dim if fits else None)
    if len(shape) == 2 and owner in _VALUE_OWNERS:
        return ParamInfo(name, shape, "value")
    if len(shape) == 2:
        return ParamInfo(name, shape, "linear")
    return ParamInfo(name, shape, "other", fallback="its name matches none of the fallback patterns")


def _fused_by_name(name: str, shape: tuple[int, ...], head_dim: int | None) -> ParamInfo:
    """A fused QKV weight in equal thirds (``[E, 3E]`` read as transposed), or ``linear``."""
    transposed = shape[1] == 3 * shape[0]
    rows = shape[1] if transposed else shape[0]
    third = rows // 3
    if head_dim is None or rows % 3 or third % head_dim:
        return ParamInfo(name, shape, "linear", transposed=transposed)
    parts = (Part("query", third, head_dim), Part("key", third, head_dim), Part("value", third))
    return ParamInfo(name, shape, "qkv", transposed=transposed, head_dim=head_dim, parts=parts)
