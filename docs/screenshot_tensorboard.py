"""Take the TensorBoard screenshots in docs/img/ from real runs, with headless Chromium.

Trains the examples at their defaults (``examples/train_gpt.py``, then
``examples/compare_optimizers.py``; about 3 minutes on a 2-core CPU), serves each log directory
with TensorBoard on 127.0.0.1 and saves what a browser shows:

* ``docs/img/tensorboard_lowmem.png``: the "Custom Scalars" tab of the ``train_gpt.py`` run, every
  ``lowmem/`` chart;
* ``docs/img/tensorboard_compare.png``: the comparison of the four optimizers (training and
  validation loss, state MB, distance to AdamW), one line per optimizer.

::

    python docs/screenshot_tensorboard.py                    # train, then take both screenshots
    python docs/screenshot_tensorboard.py --train-logdir runs/gpt_tiny/adam_mini/version_0 \\
        --compare-logdir runs/compare/version_0               # screenshots of runs you already have

Needs the ``tensorboard`` command (installed with the package) and Chromium (Debian/Ubuntu:
``apt-get install chromium``; ``--chromium`` names another binary).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"


def train_gpt(workdir: Path) -> Path:
    """Run ``examples/train_gpt.py`` at its defaults under ``workdir``; return its TensorBoard directory."""
    command = [sys.executable, str(ROOT / "examples" / "train_gpt.py"), f"log_dir={workdir / 'runs'}",
               "trainer.enable_progress_bar=false"]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=workdir).stdout
    print(out[out.index("final validation loss"):])
    return Path(re.search(r"TensorBoard logs: (\S+)", out).group(1))


def compare_optimizers(workdir: Path) -> Path:
    """Run ``examples/compare_optimizers.py`` at its defaults under ``workdir``; return its TensorBoard directory."""
    command = [sys.executable, str(ROOT / "examples" / "compare_optimizers.py"), "--log-dir", str(workdir / "compare")]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=workdir).stdout
    print(out)
    return Path(re.search(r"tensorboard --logdir (\S+)", out).group(1))


class TensorBoard:
    """A TensorBoard server on 127.0.0.1 for ``logdir``, on a free port, stopped on exit."""

    def __init__(self, logdir: Path) -> None:
        tensorboard = shutil.which("tensorboard", path=str(Path(sys.executable).parent)) or shutil.which("tensorboard")
        if tensorboard is None:
            sys.exit("screenshot_tensorboard.py: the tensorboard command is not installed (pip install tensorboard)")
        self.proc = subprocess.Popen(
            [tensorboard, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0", "--load_fast", "false"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        deadline, self.url = time.monotonic() + 90, None
        while self.url is None and time.monotonic() < deadline and self.proc.poll() is None:
            match = re.search(r"(http://127\.0\.0\.1:\d+)/", self.proc.stderr.readline())
            self.url = match.group(1) if match else None
        if self.url is None:
            self.proc.terminate()
            sys.exit(f"screenshot_tensorboard.py: TensorBoard did not start on {logdir} within 90 s")
        while time.monotonic() < deadline:  # wait for the first load of the event files
            with urllib.request.urlopen(f"{self.url}/data/plugin/scalars/tags", timeout=10) as response:
                if response.read() not in (b"{}", b""):
                    break
            time.sleep(0.5)

    def __enter__(self) -> TensorBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def screenshot(chromium: str, url: str, path: Path, width: int, height: int) -> None:
    """Save what headless Chromium shows at ``url`` after the page's scripts had 20 s to draw."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "--virtual-time-budget=20000", f"--screenshot={path}", url],
            check=True, capture_output=True, timeout=180,
        )
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train-logdir", type=Path, help="a train_gpt.py run's directory (default: train one)")
    parser.add_argument("--compare-logdir", type=Path, help="a compare_optimizers.py directory (default: run it)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    parser.add_argument("--out", type=Path, default=IMG, help="where the PNG files go")
    args = parser.parse_args()
    if shutil.which(args.chromium) is None and not Path(args.chromium).is_file():
        sys.exit(f"screenshot_tensorboard.py: no Chromium at {args.chromium!r}; apt-get install chromium, or pass --chromium")

    with tempfile.TemporaryDirectory() as workdir:
        train_dir = args.train_logdir or train_gpt(Path(workdir))
        compare_dir = args.compare_logdir or compare_optimizers(Path(workdir))
        args.out.mkdir(parents=True, exist_ok=True)
        with TensorBoard(train_dir) as tb:
            screenshot(args.chromium, f"{tb.url}/?darkMode=false#custom_scalars", args.out / "tensorboard_lowmem.png",
                       1600, 4200)
        with TensorBoard(compare_dir) as tb:
            screenshot(args.chromium, f"{tb.url}/?darkMode=false#custom_scalars", args.out / "tensorboard_compare.png",
                       1600, 1300)


if __name__ == "__main__":
    main()
