"""Run the example script and the state-memory benchmark end to end, as a user would."""

import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, timeout: float = 240) -> tuple[str, str]:
    """Run ``script`` from the repository root with this interpreter; return its stdout and stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the checkout, whatever is installed
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout, proc.stderr


def test_train_gpt_short_run_and_resume(tmp_path):
    log_dir = tmp_path / "runs"
    overrides = (
        "trainer.val_check_interval=5", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
        "data.block_size=32", "data.batch_size=8", f"data.cache_dir={tmp_path / 'cache'}",
        "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
        "optim.backend=torch", "optim.scheduler.warmup_steps=1", f"log_dir={log_dir}", "run_name=smoke",
    )
    out, _ = run_script("examples/train_gpt.py", "trainer.max_steps=5", *overrides)
    loss = float(re.search(r"final validation loss: (\d+\.\d+)", out).group(1))
    assert math.isfinite(loss) and loss < math.log(256) + 0.5  # 5 steps from a uniform guess

    state = re.search(r"optimizer state: adam_mini .* = (\d+\.\d+) bytes/param, fp32 AdamW .* = 8\.00 bytes/param", out)
    assert state is not None, out
    assert 4.0 <= float(state.group(1)) < 4.5  # m plus about one v per row or head, biases elementwise
    # the four lowmem callbacks ran: the shadow AdamW measured at step 0 (every 250 steps), no spikes
    assert "distance to AdamW's trajectory (shadow) at step 0: relative L2 0.0000" in out
    assert "loss spikes: 0 (action: skip)" in out

    tb_dir = Path(re.search(r"TensorBoard logs: (\S+)", out).group(1))
    assert tb_dir == log_dir / "smoke" / "version_0"
    assert list(tb_dir.glob("events.out.tfevents.*"))
    last = tb_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()

    out, err = run_script("examples/train_gpt.py", "trainer.max_steps=7", f"ckpt_path={last}", *overrides)
    assert f"Restored all states from the checkpoint at {last}" in out + err
    assert "TensorBoard logs: " + str(log_dir / "smoke" / "version_1") in out
    resumed = torch.load(log_dir / "smoke" / "version_1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 7
    # the callbacks' state went into the checkpoint and came back: the shadow AdamW was stepped 7 times
    (shadow,) = [v["shadow"] for k, v in resumed["callbacks"].items() if k.startswith("TrajectoryDistance")]
    assert all(int(s["step"]) == 7 for s in shadow["optimizer"]["state"].values())


def test_train_gpt_runs_the_four_callbacks_at_their_default_intervals():
    from lightning_lowmem.callbacks import LossSpikeMonitor, OptimizerDiagnostics, OptimizerStateMonitor, TrajectoryDistance

    cfg = OmegaConf.load(ROOT / "examples" / "configs" / "gpt_tiny.yaml").callbacks
    classes = {"state_monitor": OptimizerStateMonitor, "trajectory": TrajectoryDistance, "spikes": LossSpikeMonitor,
               "diagnostics": OptimizerDiagnostics}
    assert set(cfg) == set(classes)
    for key, cls in classes.items():
        defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()}
        for name, value in cfg[key].items():
            if name != "mode":  # TrajectoryDistance's mode has no default: the YAML picks shadow
                assert value == defaults[name], f"callbacks.{key}.{name} = {value}, the default is {defaults[name]}"


def test_state_memory_benchmark_meets_targets():
    out, _ = run_script("benchmarks/state_memory.py", "--json")
    rows = {row["optimizer"]: row for row in json.loads(out)}
    assert set(rows) == {"AdamW", "AdamMini (adam_mini)", "AdamMini (adam_mini_paper)", "Eve", "MicroAdam"}
    assert all(row["params"] == 124_439_808 for row in rows.values())
    bpp = {name: row["bytes_per_param"] for name, row in rows.items()}
    assert round(bpp["AdamW"], 2) == 8.00
    assert bpp["AdamMini (adam_mini)"] <= 4.05
    assert bpp["Eve"] <= 4.10
    assert bpp["MicroAdam"] <= 1.00
    # The paper's preset keeps both embeddings elementwise: 4 + 4 * (50257 + 1024) * 768 / params.
    assert abs(bpp["AdamMini (adam_mini_paper)"] - (4 + 4 * 51281 * 768 / 124_439_808)) < 0.01
