"""``benchmarks/convergence.py --quick``: the seeds' qualitative claims that must hold, end to end.

Runs the benchmark as a user would (a subprocess, about 1-2 minutes on a 2-core CPU) and checks
its exit status and the lines it prints for each check (see the benchmark's docstring).
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ("AdamW", "AdamMini", "AdamMini (paper)", "Eve", "MicroAdam", "Adafactor")
NEAR_ADAMW = ("AdamMini", "AdamMini (paper)", "Eve")


@pytest.mark.timeout(330)
def test_convergence_quick_mode_passes_its_checks():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the checkout, whatever is installed
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"convergence.py --quick failed:\n{out[-4000:]}\n{proc.stderr[-3000:]}"
    assert "FAIL:" not in out, out
    for label in TRAINED:
        assert re.search(rf"^PASS: {re.escape(label)} loss decreases: validation ", out, re.M), (label, out)
    for label in NEAR_ADAMW:
        assert re.search(rf"^PASS: {re.escape(label)} within [0-9.]+ of AdamW at lr ", out, re.M), (label, out)
    assert re.search(r"^PASS: dense Adam reaches the Rosenbrock optimum", out, re.M), out
    # Fig. 1's ordering is asserted for dense-state top-k Adam; for MicroAdam (window of 10) it is only
    # reported, as the benchmark's docstring explains
    assert re.search(r"^PASS: MicroAdam Fig\. 1 claim .* reproduced by top-k Adam \+ EF vs top-k Adam, no EF: "
                     r"[0-9.]+ with EF, [0-9.]+ without \(at least [0-9.]+ farther\)", out, re.M), out
    assert re.search(r"^NOTE: MicroAdam Fig\. 1 claim .*(reproduced|NOT reproduced) by MicroAdam \(EF\) vs "
                     r"MicroAdam, no EF: ", out, re.M), out
    runtime = re.search(r"done in (\d+) s \(quick mode\)", out)
    assert runtime is not None, out


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("convergence_benchmark", ROOT / "benchmarks" / "convergence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_non_uniform_int4_book_is_used_for_its_run_only():
    """The benchmark-only non-uniform int4 book: the reference encodes to its values times the block's
    absmax inside :func:`int4_code_book`, and the package's linear book is back afterwards, even after an error."""
    import torch

    from lightning_lowmem.kernels import momentum_formats as mf

    bench = _load_benchmark()
    candidate = next(c for c in bench.CANDIDATES if c.label == "AdamMini int4 m, non-uniform book")
    assert candidate.reference == "AdamMini" and not candidate.quick
    shipped = (mf.INT4_CODE_BOOK, mf.INT4_MIDPOINTS)
    assert torch.allclose(torch.tensor(shipped[0]) * 7, torch.arange(-7.0, 8.0))  # the package's book: k/7
    fmt = mf.MomentumFormat.of("int4", block=16)
    m = torch.linspace(-1, 1, 64).view(2, 32) ** 3
    state = fmt.new_state(m.shape, "cpu")
    book = torch.tensor(mf.NON_UNIFORM_INT4_CODE_BOOK)
    with candidate.context():
        mf.encode_(state, m, fmt)
        levels = mf.decode(state, fmt, m.shape) / state.scales.repeat_interleave(16, dim=1)
        ratio = m / m.view(2, 2, 16).abs().amax(2).repeat_interleave(16, 1)
        nearest = book[(ratio.unsqueeze(-1) - book).abs().argmin(-1)]
        assert torch.allclose(levels, nearest, atol=1e-6)
        assert torch.isclose(levels.abs(), torch.tensor(0.03)).any()  # a level the linear book does not have
    assert (mf.INT4_CODE_BOOK, mf.INT4_MIDPOINTS) == shipped
    with pytest.raises(RuntimeError), candidate.context():
        raise RuntimeError
    assert (mf.INT4_CODE_BOOK, mf.INT4_MIDPOINTS) == shipped
    with pytest.raises(ValueError):
        with bench.int4_code_book((0.0, 1.0)):
            pass
