"""``lowmem --help`` answers without importing torch or Lightning (they take seconds to import)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import contextlib, io, sys
from lightning_lowmem.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = main(["--help"])
heavy = sorted(m for m in ("torch", "lightning", "lightning.pytorch", "omegaconf") if m in sys.modules)
print(code, ",".join(heavy) or "-", "usage: lowmem" in out.getvalue() and "estimate" in out.getvalue())
"""


def test_help_imports_neither_torch_nor_lightning():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split() == ["0", "-", "True"], result.stdout + result.stderr


def test_a_command_still_gets_its_arguments_and_torch():
    probe = PROBE.replace('["--help"]', '["plan", "--help"]').replace('"estimate"', '"--preset"')
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    code, heavy, helped = result.stdout.split()
    assert (code, helped) == ("0", "True") and "torch" in heavy.split(","), result.stdout + result.stderr


def test_importing_the_package_then_lightning_registers_the_strategy():
    probe = (
        "import sys; import lightning_lowmem; assert 'torch' not in sys.modules\n"
        "from lightning.pytorch.strategies import StrategyRegistry; print('lowmem_fsdp' in StrategyRegistry)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "True", result.stdout + result.stderr
