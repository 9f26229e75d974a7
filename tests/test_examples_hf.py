"""``examples/hf_llama.py`` and ``examples/compare_optimizers.py`` run end to end, as the docs show them.

The commands are those of ``docs/partitioning.md`` and ``docs/optimizers.md`` (``tests/test_docs.py``
checks that they are run here), with arguments appended to keep the runs short. ``hf_llama.py``
needs the optional ``transformers`` extra (``pip install -e ".[hf]"``): its run is skipped without
it, and its message when the package is missing is tested either way.
"""

from __future__ import annotations

import math
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
HF_COMMAND = "python examples/hf_llama.py"  # as documented
COMPARE_COMMAND = "python examples/compare_optimizers.py --steps 20"  # as documented


def run(command: str, *extra: str) -> subprocess.CompletedProcess:
    """Run a documented ``python ...`` command with this interpreter, plus ``extra`` arguments."""
    argv = shlex.split(command)
    assert argv[0] == "python"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *argv[1:], *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, f"{command} {' '.join(extra)}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_hf_llama_plans_real_architectures_and_trains():
    pytest.importorskip("transformers", reason="examples/hf_llama.py needs transformers: pip install -e '.[hf]'")
    out = run(HF_COMMAND, "--steps", "4").stdout
    llama, gpt2 = out.split("=== GPT-2")[0], out.split("=== GPT-2")[1].split("Training")[0]

    # Llama: 8 query heads and 2 key/value heads of head_dim 32 (not hidden / heads = 16), from the config.
    assert re.search(r"self_attn\.q_proj\.weight\s+\[256, 128\]\s+query\s+head:32\n", llama), llama
    assert re.search(r"self_attn\.k_proj\.weight\s+\[64, 128\]\s+key\s+head:32\n", llama)
    assert re.search(r"self_attn\.v_proj\.weight\s+\[64, 128\]\s+value\s+row\n", llama)
    assert re.search(r"^head\s+20\s", llama, flags=re.M)  # 2 layers x (8 + 2) heads
    assert re.search(r"^lm_head\.weight\s+\[512, 128\]\s+output\s+row", llama, flags=re.M)

    # GPT-2: the fused c_attn of a Conv1D (stored [in, out]) split into Q and K heads and V rows; tied head.
    assert re.search(r"attn\.c_attn\.weight\s+\[128, 384\]\s+qkv\s+head:32x128 \| head:32x128 \| rowx128 transposed", gpt2), gpt2
    assert re.search(r"transformer\.wte\.weight\s+\[512, 128\]\s+tied_embedding\s+row \(tied: lm_head\.weight\)", gpt2)
    assert "lm_head.weight" not in gpt2.replace("(tied: lm_head.weight)", "")  # counted once

    losses = re.findall(r"^  (.+?) +(AdamMini|Eve) +loss (\d+\.\d+) -> (\d+\.\d+)$", out, flags=re.M)
    assert len(losses) == 4, out
    for model, optimizer, first, last in losses:
        assert abs(float(first) - math.log(512)) < 0.2, (model, optimizer, first)  # a uniform guess at first
        assert float(last) < float(first) - 0.3, (model, optimizer, first, last)  # it learns the batch


def test_hf_llama_says_how_to_install_transformers_when_it_is_missing(monkeypatch):
    import lightning_lowmem  # noqa: F401 - first: torchmetrics (under Lightning) imports transformers if installed

    monkeypatch.setitem(sys.modules, "transformers", None)  # now `import transformers` fails
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "examples" / "hf_llama.py"), run_name="__main__")
    message = str(exit_.value.code)
    assert 'pip install -e ".[hf]"' in message and "transformers" in message, message


def test_compare_optimizers_table(tmp_path):
    out = run(COMPARE_COMMAND, "--steps", "4", "--every", "2", "--val-batches", "2", "--log-dir", str(tmp_path)).stdout
    rows = {}
    for line in out.splitlines():
        match = re.match(r"^(AdamW|AdamMini|Eve|MicroAdam)" + r" +(\S+)" * 8 + "$", line)
        if match:
            name, *values = match.groups()
            keys = ("lr", "train", "val", "vs_adamw", "bytes", "step_ms", "opt_ms", "distance")
            rows[name] = dict(zip(keys, map(float, values)))
    assert list(rows) == ["AdamW", "AdamMini", "Eve", "MicroAdam"], out
    for name, row in rows.items():
        assert math.isfinite(row["train"]) and row["val"] < math.log(256) + 0.5, (name, row)
        assert row["step_ms"] > row["opt_ms"] > 0, (name, row)
        assert row["vs_adamw"] == pytest.approx(row["val"] - rows["AdamW"]["val"], abs=2e-4)
    # each at its stable lr from docs/benchmarks.md's sweep
    assert [row["lr"] for row in rows.values()] == [1e-3, 1e-3, 1e-3, 3e-3]
    assert rows["AdamW"]["bytes"] == 8.00
    assert 4.0 <= rows["AdamMini"]["bytes"] <= 4.1 and 4.0 <= rows["Eve"]["bytes"] <= 4.15
    assert rows["MicroAdam"]["bytes"] < 1.5  # about 1: 99% of the tiny GPT's parameters are compressed
    assert rows["AdamW"]["distance"] == 0.0  # the reference itself
    for name in ("AdamMini", "Eve", "MicroAdam"):
        assert 0.0 < rows[name]["distance"] < 0.5, (name, rows[name])  # same start and data: close, not equal
        assert f"{name} ended " in out and "nats" in out

    # one TensorBoard run per optimizer under one directory, with the callbacks' tags at the same steps
    runs = tmp_path / "version_0"
    assert sorted(p.name for p in runs.iterdir()) == ["adam_mini", "adamw", "eve", "micro_adam"]
    for run_dir in runs.iterdir():
        acc = EventAccumulator(str(run_dir))
        acc.Reload()
        assert [e.step for e in acc.Scalars("lowmem/state/total_mb")] == [2, 4]
        distance = [e.value for e in acc.Scalars("lowmem/trajectory/compare/rel_l2")]
        assert len(distance) == 2 and (distance == [0.0, 0.0]) == (run_dir.name == "adamw")
        assert len(acc.Scalars("train/loss")) == 4 and len(acc.Scalars("val/loss")) == 1
