"""What a person sees in TensorBoard after a short run with the four callbacks, read from a real server.

A TensorBoard server (the ``tensorboard`` command of this environment) is started on 127.0.0.1 on the
run's log directory; the custom-scalars layout and every scalar are read back through the HTTP JSON
routes the browser uses, so the test sees exactly the charts, series and points a reader would.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
from _cb_helpers import TinyGPT, loader, trainer

from lightning_lowmem.callbacks import LossSpikeMonitor, OptimizerDiagnostics, OptimizerStateMonitor, TrajectoryDistance

TENSORBOARD = shutil.which("tensorboard", path=str(Path(sys.executable).parent)) or shutil.which("tensorboard")
pytestmark = pytest.mark.skipif(TENSORBOARD is None, reason="the tensorboard command is not installed")

STEPS, EVERY = 6, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 6-step AdamMini run with the four callbacks every 2 steps, logged to TensorBoard."""
    root = tmp_path_factory.mktemp("tb")
    callbacks = dict(
        state=OptimizerStateMonitor(every_n_steps=EVERY),
        trajectory=TrajectoryDistance("shadow", every_n_steps=EVERY),
        spikes=LossSpikeMonitor(),
        diagnostics=OptimizerDiagnostics(every_n_steps=EVERY),
    )
    L.seed_everything(0)
    t = trainer(root, list(callbacks.values()), max_steps=STEPS)
    t.fit(TinyGPT("adam_mini"), loader())
    return dict(logdir=root / "run", callbacks=callbacks)


@pytest.fixture(scope="module")
def server(run: dict) -> Iterator[str]:
    """The base URL of a TensorBoard server on the run's log directory (stopped after the tests)."""
    proc = subprocess.Popen(
        [TENSORBOARD, "--logdir", str(run["logdir"]), "--host", "127.0.0.1", "--port", "0", "--load_fast", "false",
         "--reload_interval", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        url, deadline, seen = None, time.monotonic() + 90, []
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stderr.readline()
            seen.append(line)
            match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = match.group(1) if match else None
        assert url is not None, f"TensorBoard did not start within 90 s: {''.join(seen)[-2000:]}"
        while time.monotonic() < deadline:  # the first load of the event files
            if get(url, "/data/plugin/scalars/tags"):
                break
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def get(url: str, route: str, **query: str) -> object:
    with urllib.request.urlopen(f"{url}{route}?{urllib.parse.urlencode(query)}", timeout=30) as response:
        return json.loads(response.read())


def points(url: str, run: str, tag: str) -> dict[int, float]:
    """``step -> value`` of one series, as the scalars chart gets it."""
    return {step: value for _, step, value in get(url, "/data/plugin/scalars/scalars", run=run, tag=tag)}


def chart_series(url: str, chart: dict, tags: dict[str, dict]) -> dict[tuple[str, str], dict[int, float]]:
    """``(run, tag) -> points`` of every line of a custom-scalars chart."""
    if "margin" in chart:
        wanted = [t for series in chart["margin"]["series"] for t in (series["value"], series["lower"], series["upper"])]
        matches = lambda tag: tag in wanted  # noqa: E731
    else:
        matches = lambda tag: any(re.search(p, tag) for p in chart["multiline"]["tag"])  # noqa: E731
    return {(run, tag): points(url, run, tag) for run, run_tags in tags.items() for tag in run_tags if matches(tag)}


def test_every_chart_has_finite_points_where_expected(run: dict, server: str) -> None:
    layout = get(server, "/data/plugin/custom_scalars/layout")
    tags = get(server, "/data/plugin/scalars/tags")
    charts = {chart["title"]: chart for category in layout["category"] for chart in category["chart"]}
    state_steps = [1, 2, 4, 6]  # after the first step, every 2, and after the last (optimizer steps taken)
    distance_steps = [0, 2, 4, 6]  # from the initial weights
    diagnosed_steps = [2, 4, 5]  # update indices: every 2 but 0, and the last (index 5)
    expected = {
        # chart title -> (series, steps)
        "state MB": ({("version_0", "lowmem/state/total_mb")}, state_steps),
        "state MB by block kind": (
            {(f"version_0/lowmem_state_mb_by_kind_{k}", "lowmem/state/mb_by_kind") for k in ("full", "row", "head", "tensor")},
            state_steps,
        ),
        "saving vs fp32 AdamW (%)": ({("version_0", "lowmem/state/saving_percent")}, state_steps),
        "bytes per parameter (fp32 AdamW: 8)": ({("version_0", "lowmem/state/bytes_per_param")}, state_steps),
        "peak memory MB": ({("version_0", "lowmem/state/peak_memory_mb")}, state_steps),
        "relative L2 distance to AdamW (shadow)": ({("version_0", "lowmem/trajectory/shadow/rel_l2")}, distance_steps),
        "L2 distance to AdamW (shadow)": ({("version_0", "lowmem/trajectory/shadow/l2")}, distance_steps),
        "relative L2 distance to AdamW by block kind (shadow)": (
            {(f"version_0/lowmem_trajectory_shadow_rel_l2_by_kind_{k}", "lowmem/trajectory/shadow/rel_l2_by_kind")
             for k in ("full", "row", "tensor", "head+row")},
            distance_steps,
        ),
        "spikes so far": ({("version_0", "lowmem/spikes/count")}, list(range(STEPS))),
        "z-score against the running statistics (a spike above 6)": (
            {(f"version_0/lowmem_spikes_zscore_{m}", "lowmem/spikes/zscore") for m in ("loss", "grad_norm")},
            [2, 3, 4, 5],  # once two values made a mean and a spread
        ),
        "gradient norm (before clipping)": ({("version_0", "lowmem/diagnostics/grad_norm")}, diagnosed_steps),
        "update / weight norm by layer group": (
            {(f"version_0/lowmem_diagnostics_update_ratio_model.transformer.{g}", "lowmem/diagnostics/update_ratio")
             for g in ("wte", "wpe", "h.0", "ln_f")},
            diagnosed_steps,
        ),
    }
    for kind in ("full", "row", "head", "tensor"):
        expected[f"log10(effective lr / lr): {kind} blocks (median, p01-p99)"] = (
            {("version_0", f"lowmem/diagnostics/log10_relative_lr/{kind}/{q}") for q in ("p50", "p01", "p99")},
            diagnosed_steps,
        )
    # only charts with data: one rank (no per-rank chart), nothing spiked (no charts of spikes' values)
    assert set(charts) == set(expected)
    for title, (series, steps) in expected.items():
        got = chart_series(server, charts[title], tags)
        assert set(got) == series, title
        for key, values in got.items():
            assert sorted(values) == steps, (title, key)
            assert all(math.isfinite(v) for v in values.values()), (title, key)


def test_values_are_in_their_units(run: dict, server: str) -> None:
    memory = run["callbacks"]["state"].last
    total = points(server, "version_0", "lowmem/state/total_mb")
    assert total[STEPS] == pytest.approx(memory.total_bytes / 1e6, rel=1e-6)  # MB, not bytes
    by_kind = {k: points(server, f"version_0/lowmem_state_mb_by_kind_{k}", "lowmem/state/mb_by_kind")[STEPS]
               for k in memory.kinds}
    assert sum(by_kind.values()) == pytest.approx(total[STEPS], rel=1e-6)
    assert 20 < points(server, "version_0", "lowmem/state/peak_memory_mb")[STEPS] < 100_000  # a process's RSS in MB
    assert 40 < points(server, "version_0", "lowmem/state/saving_percent")[STEPS] < 50  # AdamMini: a bit under half
    assert 4 < points(server, "version_0", "lowmem/state/bytes_per_param")[STEPS] < 4.5
    distance = run["callbacks"]["trajectory"].last
    rel = points(server, "version_0", "lowmem/trajectory/shadow/rel_l2")
    assert rel[0] == 0 and rel[STEPS] == pytest.approx(distance.rel_l2, rel=1e-6) and 0 < rel[STEPS] < 1
    for kind in ("full", "row", "head", "tensor"):
        p01, p50, p99 = (points(server, "version_0", f"lowmem/diagnostics/log10_relative_lr/{kind}/{q}")[5]
                         for q in ("p01", "p50", "p99"))
        # log10 of 1 / (sqrt(v) + eps): between 0 (|g| ~ 1) and 8 (no gradient: 1 / eps)
        assert 0 <= p01 <= p50 <= p99 <= 8, kind
