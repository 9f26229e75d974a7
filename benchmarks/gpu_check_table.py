"""The table of ``benchmarks/gpu_check.sh``: its parts' outputs in one table, headed by the device.

    python benchmarks/gpu_check_table.py gpu_check_out

Reads ``kernel_tests.txt`` (pytest's summary line), ``step_time.txt`` (``step_time.py --json``) and
``fsdp_bf16.txt``/``fsdp_offload.txt`` (``fsdp_one_gpu.py``'s JSON line); a part that is missing or
did not finish is shown as such. Exits 1 if a part is missing or failed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() and path.stat().st_size else None


def table(out: Path) -> tuple[str, bool]:
    """The table's text and whether every part ran and passed."""
    lines, ok = [], True
    steps = _read(out / "step_time.txt")
    rows = json.loads(steps) if steps else []
    fsdp = {name: _read(out / f"{name}.txt") for name in ("fsdp_bf16", "fsdp_offload")}
    runs = {name: json.loads(text.strip().splitlines()[-1]) for name, text in fsdp.items() if text}
    device = rows[0]["device"] if rows else next((r["device"] for r in runs.values()), "unknown device")
    lines.append(f"GPU check on {device}")

    tests = _read(out / "kernel_tests.txt")
    summary = tests.strip().splitlines()[-1] if tests else "did not run"
    passed = bool(re.search(r"\d+ passed", summary)) and not re.search(r"failed|error", summary)
    ok &= passed
    lines.append(f"kernel tests (Triton compiled): {summary}")

    lines.append("")
    if rows:
        lines.append(f"{'optimizer':20s} {'ms/step':>9s} {'vs fused AdamW':>15s} {'state B/param':>14s} {'GB/s':>7s}")
        for r in rows:
            lines.append(f"{r['optimizer']:20s} {r['ms_per_step']:9.2f} {r['ratio_to_fused_adamw']:14.2f}x "
                         f"{r['state_bytes_per_param']:14.2f} {r['effective_gb_s']:7.0f}")
    else:
        ok = False
        lines.append("step time: did not run")

    lines.append("")
    lines.append(f"{'training run':36s} {'loss first -> last':>20s} {'ms/step':>9s} {'peak GB':>8s} {'C kernel tensors':>17s}")
    for name in fsdp:
        r = runs.get(name)
        if r is None:
            ok = False
            lines.append(f"{name:36s} did not run")
            continue
        lines.append(f"{r['run']:36s} {r['loss_first']:8.3f} -> {r['loss_last']:8.3f} {r['ms_per_step']:9.1f} "
                     f"{r['peak_gpu_gb']:8.2f} {r['native_kernel_tensors']:17d}")
        ok &= r["loss_last"] < r["loss_first"]
    return "\n".join(lines), ok


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    text, ok = table(Path(sys.argv[1]))
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
