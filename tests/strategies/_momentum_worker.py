"""AdamMini with bf16/int8/int4 momentum under ``LowMemFSDPStrategy``: three launches of this script.

* ``write`` (2 processes): uninterrupted 3-epoch runs; checkpoints after epoch 1 in both formats
  (``dcp``, ``full``); bf16 momentum resumed on 2 processes; a 5-step int8 run with the Triton
  kernel (interpreted on CPU); the fp32 and int8 checkpoints resumed by an optimizer of the other
  ``exp_avg_dtype`` (converted on load); a 5-step bf16 run with the torch reference.
* ``single`` (1 process): the 2-process int8/int4 checkpoints resumed for epoch 2, each saving again
  in its format; a 5-step int8 run with the torch reference; the fp32 -> int8 conversion in a plain
  ``Trainer`` (the optimizer's own ``load_state_dict``); the 5-step int8 and bf16 runs in a plain
  ``Trainer`` (no strategy): the sharded runs must equal them.
* ``back`` (2 processes): the 1-process checkpoints resumed for epoch 3 (2 -> 1 -> 2 processes).

Run as ``python _momentum_worker.py MODE OUT``; results go to OUT like ``_dist_worker.py``'s.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its kernels run on CPU tensors

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dist_worker import EPOCH_STEPS, GLOBAL_BATCH, Net, Results, checkpoint_callback, loader, strategy_for, trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _launch import end_worker  # noqa: E402

#: momentum formats checkpointed after epoch 1 and resumed
WRITTEN = ("fp32", "bf16", "int8", "int4")
#: resumed 2 -> 1 -> 2 processes
RESHARDED = ("int8", "int4")
#: (saved exp_avg_dtype, exp_avg_dtype of the optimizer that resumes it)
CONVERSIONS = (("fp32", "int8"), ("int8", "fp32"))
FORMATS = ("full", "dcp")
SAMPLES = EPOCH_STEPS * GLOBAL_BATCH


class FormatNet(Net):
    """The test model with AdamMini keeping its momentum as ``exp_avg_dtype`` (blocks of 4 entries of a row)."""

    def __init__(self, exp_avg_dtype: str, seed: int = 0, backend: str = "torch") -> None:
        super().__init__(seed=seed)
        self.exp_avg_dtype, self.backend = exp_avg_dtype, backend
        self.loaded_dtypes: dict[str, str] = {}

    def configure_optimizers(self) -> Any:
        from lightning_lowmem.optim import AdamMini

        return AdamMini(self, lr=1e-2, weight_decay=0.1, exp_avg_dtype=self.exp_avg_dtype, exp_avg_block=4, backend=self.backend)

    def on_train_start(self) -> None:
        optimizer = self.trainer.optimizers[0]
        self.loaded_dtypes = {optimizer.param_name(p): str(s["exp_avg"].dtype) for p, s in optimizer.state.items()}


class LogLines(logging.Handler):
    """The messages of the momentum conversion logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        logging.getLogger("lightning_lowmem.optim.momentum_state").addHandler(self)
        logging.getLogger("lightning_lowmem.optim.momentum_state").setLevel(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def fit(world: int, rank: int, dtype: str, epochs: int, *, fmt: str = "full", ckpt_path: Path | None = None,
        save_to: Path | None = None, seed: int = 0, backend: str = "torch") -> FormatNet:
    model = FormatNet(dtype, seed=seed, backend=backend)
    callbacks = [checkpoint_callback(save_to, fmt)] if save_to is not None else []
    trainer(world, strategy=strategy_for(fmt), max_epochs=epochs, callbacks=callbacks).fit(
        model, loader(SAMPLES, world, rank), ckpt_path=ckpt_path
    )
    return model


def five_steps(world: int, rank: int, dtype: str, *, backend: str = "torch", strategy: Any = "default") -> FormatNet:
    """5 steps of one epoch from the same start (``strategy=None``: a plain ``Trainer``)."""
    model = FormatNet(dtype, backend=backend)
    trainer(world, strategy=strategy, max_epochs=1).fit(model, loader(5 * GLOBAL_BATCH, world, rank))
    return model


def run_write(out: Path) -> None:
    world, rank = 2, int(os.environ["LOCAL_RANK"])
    res, ckpt, logs = Results(out, "write", rank), out / "ckpt", LogLines()
    for dtype in WRITTEN:
        res.weights(f"uninterrupted_{dtype}_w2", fit(world, rank, dtype, 3))
        for fmt in FORMATS:
            fit(world, rank, dtype, 1, fmt=fmt, save_to=ckpt / dtype)
    for fmt in FORMATS:  # bf16 momentum resumed exactly (its random bits depend on the step, not the run)
        res.weights(f"resume_{fmt}_bf16_w2", fit(world, rank, "bf16", 3, fmt=fmt, ckpt_path=ckpt / "bf16" / f"epoch-{fmt}.ckpt", seed=7))
    res.weights("equal_int8_triton_w2", five_steps(world, rank, "int8", backend="triton"))
    res.weights("equal_bf16_w2", five_steps(world, rank, "bf16"))
    for saved, resumed in CONVERSIONS:
        for fmt in FORMATS:
            logs.take()
            model = fit(world, rank, resumed, 2, fmt=fmt, ckpt_path=ckpt / saved / f"epoch-{fmt}.ckpt", seed=7)
            res.weights(f"convert_{fmt}_{saved}_to_{resumed}_w2", model)
            res.fact(f"convert_{fmt}_{saved}_to_{resumed}", {"logs": logs.take(), "dtypes": model.loaded_dtypes})
    res.save()


def run_single(out: Path) -> None:
    res, ckpt = Results(out, "single", 0), out / "ckpt"
    for dtype in RESHARDED:
        for fmt in FORMATS:
            fit(1, 0, dtype, 2, fmt=fmt, ckpt_path=ckpt / dtype / f"epoch-{fmt}.ckpt", save_to=ckpt / f"{dtype}_w1", seed=7)
    res.weights("equal_int8_torch_w1", five_steps(1, 0, "int8", strategy=None))
    res.weights("equal_bf16_w1", five_steps(1, 0, "bf16", strategy=None))
    for saved, resumed in CONVERSIONS:
        model = FormatNet(resumed, seed=7)
        trainer(1, strategy=None, max_epochs=2).fit(model, loader(SAMPLES, 1, 0), ckpt_path=ckpt / saved / "epoch-full.ckpt")
        res.weights(f"convert_plain_{saved}_to_{resumed}_w1", model)
    res.save()


def run_back(out: Path) -> None:
    world, rank = 2, int(os.environ["LOCAL_RANK"])
    res, ckpt = Results(out, "back", rank), out / "ckpt"
    for dtype in RESHARDED:
        for fmt in FORMATS:
            model = fit(world, rank, dtype, 3, fmt=fmt, ckpt_path=ckpt / f"{dtype}_w1" / f"epoch-{fmt}.ckpt", seed=11)
            res.weights(f"resume_{fmt}_{dtype}_w2_w1_w2", model)
    res.save()


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    try:
        {"write": run_write, "single": run_single, "back": run_back}[mode](out)
    except BaseException:
        traceback.print_exc()
        end_worker(1)
    end_worker(0)


if __name__ == "__main__":
    main()
