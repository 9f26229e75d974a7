"""TrajectoryDistance: record/compare against AdamW snapshots, the shadow AdamW, errors, resume."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from _cb_helpers import Events, TinyGPT, loader, tiny_config, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lowmem.callbacks import LossSpikeMonitor, TrajectoryDistance, weight_distance
from lightning_lowmem.callbacks.core.distance import list_snapshots

EVERY, STEPS = 4, 16
KINDS_ADAM_MINI = {"full", "row", "tensor", "head+row"}  # c_attn: Q/K by head, V by row


def fit(tmp_path: Path, name: str, module: TinyGPT, callbacks: list, num_sequences: int = 64, **kwargs) -> L.Trainer:
    L.seed_everything(0)
    t = trainer(tmp_path, callbacks, name=name, **{"max_steps": STEPS, **kwargs})
    t.fit(module, loader(num_sequences))
    return t


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    """AdamW snapshots every 4 steps, at lr 3e-3 and 3e-4."""
    root = tmp_path_factory.mktemp("recordings")
    out = {}
    for lr in (3e-3, 3e-4):
        out[lr] = root / f"adamw_{lr}"
        fit(root, f"record_{lr}", TinyGPT("adamw", lr=lr), [TrajectoryDistance("record", out[lr], every_n_steps=EVERY)])
    return out


def distances(tmp_path: Path, name: str, mode: str) -> dict[str, dict[int, float]]:
    events = Events(tmp_path / name / "version_0")
    prefix = f"lowmem/trajectory/{mode}/"
    out = {tag[len(prefix):]: events.scalars(tag) for tag in events.tags() if tag.startswith(prefix)}
    for kind, values in events.series(f"{prefix}rel_l2_by_kind").items():  # one run per kind
        out[f"rel_l2/{kind}"] = values
    return out


def test_record_writes_a_snapshot_every_n_steps(recordings: dict[float, Path]) -> None:
    snapshots = list_snapshots(recordings[3e-3])
    assert sorted(snapshots) == [0, 4, 8, 12, 16]
    assert (snapshots[16] / ".metadata").is_file()


def test_adamw_against_its_own_recording_is_exactly_zero(tmp_path: Path, recordings: dict[float, Path]) -> None:
    compare = TrajectoryDistance("compare", recordings[3e-3], every_n_steps=EVERY)
    fit(tmp_path, "adamw", TinyGPT("adamw"), [compare])
    logged = distances(tmp_path, "adamw", "compare")
    assert set(logged) == {"l2", "rel_l2", "rel_l2/full"}
    for tag, values in logged.items():
        assert values == {step: 0.0 for step in range(0, STEPS + 1, EVERY)}, tag


def test_adam_mini_distance_is_small_positive_and_grows(tmp_path: Path, recordings: dict[float, Path]) -> None:
    compare = TrajectoryDistance("compare", recordings[3e-3], every_n_steps=EVERY)
    fit(tmp_path, "mini", TinyGPT("adam_mini"), [compare])
    logged = distances(tmp_path, "mini", "compare")
    l2, rel = logged["l2"], logged["rel_l2"]
    assert l2[0] == 0.0 and rel[0] == 0.0  # same initial weights
    values = [l2[s] for s in range(EVERY, STEPS + 1, EVERY)]
    assert all(b > a > 0 for a, b in zip(values, values[1:]))
    assert 0 < rel[STEPS] < 0.2
    kinds = {tag.split("/")[1] for tag in logged if tag.startswith("rel_l2/")}
    assert kinds == KINDS_ADAM_MINI == set(compare.last.by_kind)
    assert sum(l2_kind**2 for l2_kind, _ in compare.last.by_kind.values()) == pytest.approx(compare.last.l2**2, rel=1e-9)
    for kind in kinds:
        assert logged[f"rel_l2/{kind}"][STEPS] == pytest.approx(compare.last.by_kind[kind][1], rel=1e-6)
    assert compare.last.l2 == pytest.approx(l2[STEPS], rel=1e-6)


def test_shadow_and_compare_agree(tmp_path: Path, recordings: dict[float, Path]) -> None:
    # AdamW: its shadow and its recording are both exactly where it is.
    both = [TrajectoryDistance("shadow", every_n_steps=EVERY), TrajectoryDistance("compare", recordings[3e-3], every_n_steps=EVERY)]
    fit(tmp_path, "adamw", TinyGPT("adamw"), both)
    for mode in ("shadow", "compare"):
        assert set(distances(tmp_path, "adamw", mode)["l2"].values()) == {0.0}

    # AdamMini at a small learning rate: the shadow (AdamW fed AdamMini's gradients) and the recorded AdamW
    # trajectory give the same distance to within a few percent, and AdamMini's `full` blocks (biases) are
    # AdamW's update (up to round-off), so their shadow distance is ~0 while their trajectories do part.
    lr = 3e-4
    both = [TrajectoryDistance("shadow", every_n_steps=EVERY), TrajectoryDistance("compare", recordings[lr], every_n_steps=EVERY)]
    fit(tmp_path, "mini", TinyGPT("adam_mini", lr=lr), both)
    shadow, compare = distances(tmp_path, "mini", "shadow"), distances(tmp_path, "mini", "compare")
    for step in range(EVERY, STEPS + 1, EVERY):
        assert shadow["l2"][step] == pytest.approx(compare["l2"][step], rel=0.05), step
        assert shadow["rel_l2"][step] == pytest.approx(compare["rel_l2"][step], rel=0.05), step
        assert shadow["rel_l2/full"][step] < 1e-4 * compare["rel_l2/full"][step]


@pytest.mark.parametrize("action", ["skip", "lr_backoff"])
def test_shadow_follows_what_the_spike_monitor_does(tmp_path: Path, action: str) -> None:
    """A skipped step is skipped by the shadow too; a backed-off step runs at the same reduced lr."""
    spikes = LossSpikeMonitor(action=action, warmup=5, backoff_steps=3)
    shadow = TrajectoryDistance("shadow", every_n_steps=EVERY)
    fit(tmp_path, "run", TinyGPT("adamw", spike_batches=(10,)), [spikes, shadow], num_sequences=160)
    assert spikes.count == 1 and spikes.events[0]["action"] == action
    assert set(distances(tmp_path, "run", "shadow")["l2"].values()) == {0.0}


def test_shadow_resumes(tmp_path: Path) -> None:
    def run(name: str, epochs: int, ckpt_path: str | None = None) -> TrajectoryDistance:
        shadow = TrajectoryDistance("shadow", every_n_steps=2)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / f"{name}_ckpt", every_n_epochs=1, save_top_k=-1)
        L.seed_everything(0)
        t = trainer(tmp_path, [shadow, checkpoint], name=name, max_epochs=epochs, max_steps=-1, enable_checkpointing=True)
        t.fit(TinyGPT("adam_mini"), loader(num_sequences=48), ckpt_path=ckpt_path)
        return shadow

    straight = run("straight", 2)
    run("first", 1)
    (ckpt,) = (tmp_path / "first_ckpt").glob("*.ckpt")
    resumed = run("resumed", 2, str(ckpt))
    assert resumed.last.l2 == straight.last.l2 > 0
    for name, w in straight.shadow.weights.items():
        assert torch.equal(resumed.shadow.weights[name], w)


def test_missing_recording(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"found no snapshots in '.*nowhere' \(the directory does not exist\)"):
        fit(tmp_path, "run", TinyGPT(), [TrajectoryDistance("compare", tmp_path / "nowhere")])


def test_missing_step(tmp_path: Path, recordings: dict[float, Path]) -> None:
    compare = TrajectoryDistance("compare", recordings[3e-3], every_n_steps=EVERY)
    with pytest.raises(FileNotFoundError, match=r"needs the snapshot after step 20 .* holds steps \[0, 4, 8, 12, 16\]"):
        fit(tmp_path, "run", TinyGPT(), [compare], max_steps=20)


def test_other_parameter_names(tmp_path: Path, recordings: dict[float, Path]) -> None:
    compare = TrajectoryDistance("compare", recordings[3e-3], every_n_steps=EVERY)
    with pytest.raises(ValueError, match=r"\['model.transformer.h.1.ln_1.weight', .* not in the snapshot .*, none not in the model"):
        fit(tmp_path, "run", TinyGPT(config=tiny_config(n_layer=2)), [compare])


def test_other_shapes(tmp_path: Path, recordings: dict[float, Path]) -> None:
    compare = TrajectoryDistance("compare", recordings[3e-3], every_n_steps=EVERY)
    with pytest.raises(ValueError, match=r"'model.transformer.wte.weight': \[32, 32\] in the snapshot .*, \[32, 48\] in the model"):
        fit(tmp_path, "run", TinyGPT(config=tiny_config(n_embd=48)), [compare])


def test_weight_distance_by_kind() -> None:
    w = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0]]), "c": torch.tensor([0.0])}
    r = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([[0.0]]), "c": torch.tensor([4.0])}
    d = weight_distance(w, r, {"a": "row", "b": "row", "c": "full"})
    assert d.l2 == pytest.approx(math.sqrt(4 + 9 + 16))
    assert d.rel_l2 == pytest.approx(math.sqrt(29) / math.sqrt(1 + 16))
    assert d.by_kind == {"row": pytest.approx((math.sqrt(13), math.sqrt(13))), "full": pytest.approx((4.0, 1.0))}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="replay"), r"Invalid mode: 'replay'; choose one of 'record', 'compare', 'shadow'"),
        (dict(mode="record"), r"TrajectoryDistance\(mode='record'\) needs the snapshots' directory"),
        (dict(mode="shadow", dirpath="x"), "takes no dirpath"),
        (dict(mode="compare", dirpath="x", shadow_hparams={"lr": 1.0}), "shadow_hparams only applies to mode='shadow'"),
        (dict(mode="shadow", every_n_steps=0), "every_n_steps must be an int >= 1, got 0"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrajectoryDistance(**kwargs)
