"""The ``lowmem`` command: optimizer-state memory estimates and block plans for a model, without weights.

::

    lowmem estimate llama2-7b                  # AdamW vs AdamMini (each preset), Eve, MicroAdam, in GB
    lowmem estimate path/to/config.json --format json
    lowmem plan gpt2 --preset adam_mini_paper  # which parameter got which blocks (layers collapsed)
    lowmem plan gpt2 --details                 # every tensor

``MODEL`` is a known name (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, ``tinyllama-1b``,
``llama2-7b``, ``llama2-13b``, ``llama2-70b``, ``llama3-8b``) or a Hugging Face ``config.json`` (or
its directory). ``gpt2``, ``llama`` and ``mistral`` configs are built by the package itself
(``transformers`` is not needed); any other ``model_type`` ``transformers`` knows (``mixtral``,
``qwen2_moe``, ``deepseek_v3``, ``gpt_neox``, ``falcon``, ``phi3``, ``bert``, ``t5``, ...) is built
through ``transformers``. The model is built on the meta device: nothing is allocated or
downloaded. States are float32
and GB are 1e9 bytes. For the models of the Adam-mini paper's Table 1 (``gpt2-xl``,
``tinyllama-1b``, ``llama2-7b``) ``estimate`` adds a note comparing with the paper's figures (see
:mod:`lightning_lowmem.estimate` for why they differ in the last digit).

Exit status: 0 on success, 2 for bad input (unknown model name, unreadable or invalid config file,
unsupported architecture, bad arguments), with the reason on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

# torch (and what imports it) is imported by the commands that need it, not for `lowmem --help`.
if TYPE_CHECKING:
    from torch import nn

    from lightning_lowmem.estimate import StateEstimate
    from lightning_lowmem.models.known import ModelConfig
    from lightning_lowmem.partition import BlockPlan

PROG = "lowmem"
EXIT_BAD_INPUT = 2
_NOTE_WIDTH = 100


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lowmem`` command with ``argv`` (``sys.argv[1:]`` if ``None``); return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Without a command (`lowmem --help`) the commands' own arguments, which need torch, are not built.
    parser = _parser(with_arguments=any(not arg.startswith("-") for arg in argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already reported on stderr
        return exit_.code if isinstance(exit_.code, int) else EXIT_BAD_INPUT
    if args.command == "build-kernels":
        return _build_kernels()
    from lightning_lowmem.models.known import ModelSpecError, build_meta_model, resolve_config

    try:
        config = resolve_config(args.model)
    except ModelSpecError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    model = build_meta_model(config)
    try:
        if args.command == "estimate":
            _estimate(args.model, config, model, args.format, sys.stdout)
        else:
            _plan(args.model, config, model, args.preset, args.details, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # `lowmem plan ... | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


def _parser(with_arguments: bool = True) -> argparse.ArgumentParser:
    """The ``lowmem`` parser; without ``with_arguments``, the commands and their help line only (no torch)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Optimizer-state memory and block plans of a model, computed on the meta device "
        "(no weights, no downloads).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    estimate = commands.add_parser(
        "estimate",
        help="fp32 optimizer-state GB for AdamW, AdamMini, Eve and MicroAdam",
        description="Parameters and fp32 optimizer-state memory (GB = 1e9 bytes) of AdamW, AdamMini "
        "(each preset), Eve and MicroAdam, with the saving versus AdamW.",
    )
    plan = commands.add_parser(
        "plan",
        help="the block plan: which parameter got which second-moment blocks",
        description="The block plan of a model: blocks, parameters and state per block kind, then each "
        "parameter's blocks (repeated layers collapsed unless --details).",
    )
    commands.add_parser(
        "build-kernels",
        help="build the C kernels for CPUs now (e.g. in a container image) and print where they are cached",
        description="Build the package's C kernels with $CC for this machine's CPU and print the cache "
        "($LIGHTNING_LOWMEM_CACHE, default ~/.cache/lightning_lowmem). Exit status 1 if one fails.",
    )
    if not with_arguments:
        return parser
    from lightning_lowmem.models.known import KNOWN_MODELS
    from lightning_lowmem.partition import PRESETS

    model_help = (
        f"a known model ({', '.join(KNOWN_MODELS)}) or the path to a Hugging Face config.json (or its "
        "directory) with a model_type transformers knows (gpt2, llama or mistral without transformers)"
    )
    estimate.add_argument("model", metavar="MODEL", help=model_help)
    estimate.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    plan.add_argument("model", metavar="MODEL", help=model_help)
    plan.add_argument("--preset", choices=PRESETS, default="adam_mini", help="block preset (default: adam_mini)")
    plan.add_argument("--details", action="store_true", help="list every tensor instead of collapsing repeated layers")
    return parser


def _build_kernels() -> int:
    """``lowmem build-kernels``: each kernel's library path, or the compiler's message on stderr."""
    from lightning_lowmem.kernels.native import build_all, cache_dir

    print(f"cache: {cache_dir()}")
    status = 0
    for name, build in build_all().items():
        if build.library is not None:
            print(f"{name}: {build.path}")
        else:
            print(f"{PROG} build-kernels: {name} not built: {build.problem}", file=sys.stderr)
            status = 1
    return status


# ---- estimate ------------------------------------------------------------------------------------


def _estimate(name: str, config: ModelConfig, model: nn.Module, fmt: str, out: TextIO) -> None:
    from lightning_lowmem.estimate import PAPER_TABLE1, estimate_state_memory, paper_table1_note
    from lightning_lowmem.models.known import describe_config

    rows = estimate_state_memory(model)
    paper_key = _paper_key(model)
    note = paper_table1_note(paper_key, rows) if paper_key else []
    if fmt == "json":
        payload = dict(
            model=name,
            description=describe_config(config),
            architecture=_architecture(config),
            config=dataclasses.asdict(config),
            num_params=rows[0].num_params,
            state_dtype="float32",
            bytes_per_gb=10**9,
            estimates=[row.as_dict() for row in rows],
            paper_table1=dict(PAPER_TABLE1[paper_key].as_dict(), note=note) if paper_key else None,
        )
        json.dump(payload, out, indent=2)
        out.write("\n")
        return
    out.write(f"{name}: {describe_config(config)}\n")
    out.write(f"{rows[0].num_params:,} parameters (built on the meta device: nothing allocated or downloaded)\n")
    out.write("Optimizer state (float32 where the row names no other format), GB = 1e9 bytes:\n\n")
    out.write(_estimate_table(rows) + "\n")
    if note:
        out.write("\n" + _format_note(note) + "\n")


def _estimate_table(rows: Sequence[StateEstimate]) -> str:
    header = ("optimizer", "state GB", "bytes/param", "saving")
    cells = [
        (row.label, f"{row.state_gb:.2f}", f"{row.bytes_per_param:.3f}",
         "-" if row.optimizer == "AdamW" else f"{row.saving_percent:.2f}%")
        for row in rows
    ]
    return _table(header, cells)


def _format_note(lines: Sequence[str]) -> str:
    first, *rest = lines
    wrapped = [textwrap.fill(first, _NOTE_WIDTH, subsequent_indent="  ")]
    wrapped += [textwrap.fill(line, _NOTE_WIDTH, initial_indent="  - ", subsequent_indent="    ") for line in rest]
    return "\n".join(wrapped)


def _paper_key(model: nn.Module) -> str | None:
    """The Table 1 model with exactly ``model``'s parameter names and shapes, if any (so a config.json
    of Llama-2-7B gets the paper note as well as the name ``llama2-7b``)."""
    from lightning_lowmem.estimate import PAPER_TABLE1

    signature = _signature(model)
    return next((key for key in PAPER_TABLE1 if _known_signature(key) == signature), None)


def _signature(model: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


@functools.cache
def _known_signature(name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from lightning_lowmem.models.known import build_meta_model

    return _signature(build_meta_model(name))


# ---- plan ----------------------------------------------------------------------------------------


def _plan(name: str, config: ModelConfig, model: nn.Module, preset: str, details: bool, out: TextIO) -> None:
    from lightning_lowmem.models.known import describe_config
    from lightning_lowmem.partition import build_plan

    plan = build_plan(model, preset)
    out.write(f"{name}: {describe_config(config)}\n")
    out.write(f"{plan.num_params:,} parameters (built on the meta device)\n\n")
    out.write(plan.summary() + "\n\n")
    if details:
        out.write("Every parameter (fused projections: spec x rows per segment):\n\n")
        lines = plan.details().splitlines()
    else:
        out.write("Every parameter, layers laid out alike on one line ({first-last}; --details lists each tensor):\n\n")
        lines = collapse_layers(plan)
    header = ("parameter", "shape", "role", "blocks")
    out.write(_table(header, [_columns(line, len(header)) for line in lines], align_right=False) + "\n")


def _columns(line: str, count: int) -> list[str]:
    """A :meth:`BlockPlan.details` line (fields separated by two spaces) as ``count`` cells."""
    cells = line.split("  ", count - 1)
    return cells + [""] * (count - len(cells))


def collapse_layers(plan: BlockPlan) -> list[str]:
    """:meth:`BlockPlan.details` lines with the layers that are laid out alike merged into one line.

    A name with one layer index (``transformer.h.3.attn.c_attn.weight``) is grouped with the other
    layers whose line is otherwise identical; the group shows its indices as ranges
    (``transformer.h.{0-11}.attn.c_attn.weight``), so a layer given other blocks by a rule stands out.
    """
    groups: dict[tuple[str, str, str], list[int]] = {}
    for line in plan.details().splitlines():
        name, sep, rest = line.partition("  ")
        indices = list(re.finditer(r"(?<=\.)\d+(?=\.)", name))
        if len(indices) != 1:
            groups.setdefault((name, "", sep + rest), [])
            continue
        match = indices[0]
        groups.setdefault((name[: match.start()], name[match.end():], sep + rest), []).append(int(match.group()))
    lines = []
    for (head, tail, rest), layers in groups.items():
        lines.append(f"{head}{{{_ranges(layers)}}}{tail}{rest}" if layers else f"{head}{rest}")
    return lines


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    parts, start = [], None
    values = sorted(values)
    for i, value in enumerate(values):
        if start is None:
            start = value
        if i + 1 == len(values) or values[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ",".join(parts)


# ---- output helpers ------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align_right: bool = True) -> str:
    """Columns separated by two spaces: the first left-aligned, the others right-aligned if asked."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[Any]) -> str:
        cells_widths = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.rjust(w) if i and align_right else c.ljust(w) for i, (c, w) in cells_widths).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _architecture(config: ModelConfig) -> str:
    """``gpt2``/``llama`` for the package's own models, the ``model_type`` for a transformers one."""
    from lightning_lowmem.models.gpt import GPTConfig

    if isinstance(config, GPTConfig):
        return "gpt2"
    return getattr(config, "model_type", "llama")


if __name__ == "__main__":
    sys.exit(main())

