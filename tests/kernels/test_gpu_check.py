"""``benchmarks/gpu_check.sh`` and the scripts it runs, as far as a machine without CUDA can check them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")


def _run(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_the_script_parses_and_every_part_it_runs_exists():
    assert _run("bash", "-n", str(BENCHMARKS / "gpu_check.sh")).returncode == 0
    script = (BENCHMARKS / "gpu_check.sh").read_text()
    for name in ("step_time.py", "fsdp_one_gpu.py", "gpu_check_table.py"):
        assert f"benchmarks/{name}" in script and (BENCHMARKS / name).exists()
    assert "TRITON_INTERPRET=0" in script and "tests/kernels" in script
    limits = [int(word) for line in script.splitlines() if line.startswith("part ") for word in line.split()[2:3]]
    assert len(limits) == 4 and sum(limits) <= 8 * 60  # the time limits fit the 8 minutes


@no_cuda
def test_without_cuda_the_script_stops_at_once():
    result = _run("bash", str(BENCHMARKS / "gpu_check.sh"))
    assert result.returncode == 2 and "no CUDA device" in result.stderr


@no_cuda
@pytest.mark.parametrize("script", ["step_time.py", "fsdp_one_gpu.py"])
def test_the_python_parts_refuse_cuda_clearly_without_it(script):
    result = _run(sys.executable, str(BENCHMARKS / script), "--device", "cuda")
    assert result.returncode != 0 and "--device cuda needs CUDA" in result.stderr


def _table(tmp_path, **parts: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from gpu_check_table import table
    finally:
        sys.path.remove(str(BENCHMARKS))
    for name, text in parts.items():
        (tmp_path / f"{name}.txt").write_text(text)
    return table(tmp_path)


STEP_ROWS = [
    dict(optimizer="AdamW fused", device="NVIDIA H100 80GB HBM3", ms_per_step=1.5, ratio_to_fused_adamw=1.0,
         state_bytes_per_param=8.0, effective_gb_s=2300.0, warmup_s=1.0, params=124439808),
    dict(optimizer="AdamMini triton", device="NVIDIA H100 80GB HBM3", ms_per_step=1.1, ratio_to_fused_adamw=0.73,
         state_bytes_per_param=4.01, effective_gb_s=2250.0, warmup_s=3.0, params=124439808),
]


def _fsdp(run: str, last: float) -> str:
    return "log line\n" + json.dumps(dict(run=run, device="NVIDIA H100 80GB HBM3", steps=30, loss_first=10.9,
                                          loss_last=last, ms_per_step=41.0, peak_gpu_gb=2.1,
                                          native_kernel_tensors=0)) + "\n"


def test_the_table_heads_with_the_device_and_shows_every_part(tmp_path):
    text, ok = _table(tmp_path, kernel_tests="....\n120 passed in 95.00s\n", step_time=json.dumps(STEP_ROWS),
                      fsdp_bf16=_fsdp("lowmem_fsdp bf16-mixed", 6.0),
                      fsdp_offload=_fsdp("lowmem_fsdp bf16-mixed cpu_offload", 6.1))
    assert ok
    lines = text.splitlines()
    assert lines[0] == "GPU check on NVIDIA H100 80GB HBM3"
    assert "120 passed" in lines[1]
    assert any(line.startswith("AdamMini triton") and "0.73x" in line for line in lines)
    assert any(line.startswith("lowmem_fsdp bf16-mixed cpu_offload") and "10.900 ->    6.100" in line for line in lines)


def test_the_table_fails_on_a_failed_or_missing_part(tmp_path):
    text, ok = _table(tmp_path, kernel_tests="1 failed, 119 passed in 95.00s\n", step_time=json.dumps(STEP_ROWS),
                      fsdp_bf16=_fsdp("lowmem_fsdp bf16-mixed", 11.0))
    assert not ok
    assert "fsdp_offload" in text and "did not run" in text
