"""Run the example script and the state-memory benchmark end to end, as a user would."""

import importlib.util
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
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, timeout: float = 240, returncode: int = 0, cwd: Path = ROOT) -> tuple[str, str]:
    """Run ``script`` with this interpreter; check its exit status; return its stdout and stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the checkout, whatever is installed
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == returncode, f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout, proc.stderr


def test_train_gpt_short_run_and_resume(tmp_path):
    log_dir = tmp_path / "runs"
    overrides = (
        "trainer.val_check_interval=5", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
        "data.block_size=32", "data.batch_size=8", f"data.cache_dir={tmp_path / 'cache'}",
        "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
        "optim.backend=torch", f"log_dir={log_dir}", "run_name=smoke",
    )
    out, _ = run_script("examples/train_gpt.py", "trainer.max_steps=5", *overrides)
    # the config's 20 warmup steps do not fit in 5: a smoke run needs no second override
    assert "optim.scheduler.warmup_steps=20 does not fit in trainer.max_steps=5: warming up for 0 steps instead" in out
    loss = float(re.search(r"final validation loss: (\d+\.\d+)", out).group(1))
    assert math.isfinite(loss) and loss < math.log(256) + 0.5  # 5 steps from a uniform guess

    state = re.search(r"optimizer state: adam_mini .* = (\d+\.\d+) bytes/param, fp32 AdamW .* = 8\.00 bytes/param", out)
    assert state is not None, out
    assert 4.0 <= float(state.group(1)) < 4.5  # m plus about one v per row or head, biases elementwise
    # the four lowmem callbacks ran: the shadow AdamW measured at the last step too, no spikes
    distance = float(re.search(r"distance to AdamW's trajectory \(shadow\) at step 5: relative L2 (\d\.\d+)", out).group(1))
    assert 0 < distance < 0.5
    assert "loss spikes: 0 (action: skip)" in out

    tb_dir = Path(re.search(r"TensorBoard logs: (\S+)", out).group(1))
    assert tb_dir == log_dir / "smoke" / "adam_mini" / "version_0"  # runs are named after the optimizer
    (events,) = tb_dir.glob("events.out.tfevents.*")  # the final validation writes no second event file
    acc = EventAccumulator(str(events))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "hp_metric" not in scalars
    val_steps = [e.step for e in acc.Scalars("val/loss")]
    assert val_steps == [4]  # validated once, at val_check_interval=5 (after batch index 4): no duplicate
    last = tb_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()

    out, err = run_script("examples/train_gpt.py", "trainer.max_steps=7", f"ckpt_path={last}", *overrides)
    assert f"Restored all states from the checkpoint at {last}" in out + err
    assert "TensorBoard logs: " + str(log_dir / "smoke" / "adam_mini" / "version_1") in out
    resumed = torch.load(log_dir / "smoke" / "adam_mini" / "version_1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 7
    # the callbacks' state went into the checkpoint and came back: the shadow AdamW was stepped 7 times
    (shadow,) = [v["shadow"] for k, v in resumed["callbacks"].items() if k.startswith("TrajectoryDistance")]
    assert all(int(s["step"]) == 7 for s in shadow["optimizer"]["state"].values())


def test_train_gpt_help_prints_the_keys_with_their_defaults_and_exits(tmp_path):
    out, _ = run_script("examples/train_gpt.py", "--help", cwd=tmp_path)
    assert "usage" in out.lower() or "python examples/train_gpt.py" in out
    for line in ("max_steps: 300", "name: adam_mini", "lr: 3.0e-3", "every_n_steps: 10", "mode: shadow"):
        assert line in out, line
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_train_gpt_unknown_keys_are_errors_that_name_the_closest(tmp_path):
    cases = {
        "max_steps=5": "did you mean trainer.max_steps?",
        "trainer.max_stepz=5": "did you mean trainer.max_steps",
        "optim.lrr=1e-3": "did you mean optim.lr",
        "callbacks.trajectory.every_n_step=5": "did you mean callbacks.trajectory.every_n_steps",
    }
    for arg, hint in cases.items():
        _, err = run_script("examples/train_gpt.py", arg, returncode=2, cwd=tmp_path)
        key = arg.split("=")[0]
        assert f"train_gpt.py: error: unknown key '{key}' in the command line; {hint}" in err, err
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  nmae: eve\n")
    _, err = run_script("examples/train_gpt.py", f"config={bad}", returncode=2, cwd=tmp_path)
    assert f"unknown key 'optim.nmae' in {bad}; did you mean optim.name" in err
    assert not any(p for p in tmp_path.iterdir() if p != bad)


def test_train_gpt_config_names_real_arguments():
    from lightning_lowmem.callbacks import LossSpikeMonitor, OptimizerDiagnostics, OptimizerStateMonitor, TrajectoryDistance

    cfg = OmegaConf.load(ROOT / "examples" / "configs" / "gpt_tiny.yaml").callbacks
    classes = {"state_monitor": OptimizerStateMonitor, "trajectory": TrajectoryDistance, "spikes": LossSpikeMonitor,
               "diagnostics": OptimizerDiagnostics}
    assert set(cfg) == set(classes)
    for key, cls in classes.items():
        assert set(cfg[key]) <= set(inspect.signature(cls).parameters), key
    # the distance and the diagnostics draw curves over the config's 300 steps
    steps = OmegaConf.load(ROOT / "examples" / "configs" / "gpt_tiny.yaml").trainer.max_steps
    assert steps // cfg.trajectory.every_n_steps >= 20 and steps // cfg.diagnostics.every_n_steps >= 20


def test_callback_overhead_benchmark_measures_every_callback():
    """A short run of the benchmark: each callback at its default interval (snapshots for the compare
    mode at TrajectoryDistance's own interval and last step) gets a finite, positive cost."""
    out, _ = run_script("benchmarks/callback_overhead.py", "--steps", "21", "--rounds", "1")
    labels = ("OptimizerStateMonitor()", "TrajectoryDistance(compare)", "LossSpikeMonitor()", "OptimizerDiagnostics()",
              "the four together", "TrajectoryDistance(record)", "TrajectoryDistance(shadow)")
    for label in labels:
        row = re.search(rf"^{re.escape(label)}\s+([0-9.]+)\s+([0-9.]+)%$", out, re.MULTILINE)
        assert row is not None, (label, out)
        assert 0 < float(row.group(1)) < 1000, row.group(0)


def test_state_memory_benchmark_meets_targets():
    out, _ = run_script("benchmarks/state_memory.py", "--json")
    rows = {row["optimizer"]: row for row in json.loads(out)}
    ours = {"AdamW", "AdamMini (adam_mini)", "AdamMini (adam_mini_paper)", "Eve", "MicroAdam", "AdamMini bf16 m",
            "AdamMini int8 m", "AdamMini int4 m"}
    peers = {"torchao AdamW8bit", "torchao AdamW4bit"} if importlib.util.find_spec("torchao") else set()
    assert set(rows) == ours | peers
    assert all(row["params"] == 124_439_808 for row in rows.values())
    bpp = {name: row["bytes_per_param"] for name, row in rows.items()}
    assert round(bpp["AdamW"], 2) == 8.00
    assert bpp["AdamMini (adam_mini)"] <= 4.05
    assert bpp["Eve"] <= 4.10
    assert bpp["MicroAdam"] <= 1.00
    # issue 17: momentum codes, scales, v and step counted
    assert bpp["AdamMini bf16 m"] <= 2.05 and bpp["AdamMini int8 m"] <= 1.05 and bpp["AdamMini int4 m"] <= 0.55
    # The paper's preset keeps both embeddings elementwise: 4 + 4 * (50257 + 1024) * 768 / params.
    assert abs(bpp["AdamMini (adam_mini_paper)"] - (4 + 4 * 51281 * 768 / 124_439_808)) < 0.01
