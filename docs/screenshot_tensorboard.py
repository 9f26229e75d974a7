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
import base64
import contextlib
import json
import os
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


def _as_fds_3_and_4(read_end: int, write_end: int) -> None:
    high_read, high_write = os.dup(read_end), os.dup(write_end)  # out of the way of 3 and 4 first
    os.dup2(high_read, 3)
    os.dup2(high_write, 4)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: no port)."""

    def __init__(self, binary: str, profile: str) -> None:
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False,
            preexec_fn=lambda: _as_fds_3_and_4(to_browser, from_browser),  # where Chromium reads and writes
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._id = b"", 0
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, **params: object) -> dict:
        """Send one command and return its result (events that arrive meanwhile are dropped)."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._read, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the DevTools pipe during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def page(self, method: str, **params: object) -> dict:
        return self.call(method, session=self.session, **params)

    def screenshot(self, url: str, path: Path, width: int, height: int, settle_s: float = 15.0) -> None:
        """Open ``url`` in a ``width`` x ``height`` window, let its charts draw, save the page as PNG."""
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.page("Page.navigate", url=url)
        time.sleep(settle_s)
        data = self.page("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"wrote {path}")

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):
            self.call("Browser.close")
        self.proc.wait(timeout=30)


def screenshot(chromium: str, tb_url: str, path: Path, width: int, height: int, settle_s: float) -> None:
    """The Custom Scalars tab of ``tb_url`` without smoothing and with every point in the charts' scale.

    TensorBoard's defaults (smoothing 0.6, outliers left out of the y range) cut off the end of a
    rising line drawn from a few dozen points; its outlier setting lives in the page's
    localStorage, set here before the charts load.
    """
    with tempfile.TemporaryDirectory() as profile:
        browser = Chromium(chromium, profile)
        try:
            browser.page("Page.navigate", url=f"{tb_url}/")
            time.sleep(3)
            browser.page("Runtime.evaluate", expression="localStorage.setItem('_ignoreYOutliers', 'false')")
            browser.screenshot(f"{tb_url}/?darkMode=false#custom_scalars&_smoothingWeight=0", path, width, height, settle_s)
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train-logdir", type=Path, help="a train_gpt.py run's directory (default: train one)")
    parser.add_argument("--compare-logdir", type=Path, help="a compare_optimizers.py directory (default: run it)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    parser.add_argument("--out", type=Path, default=IMG, help="where the PNG files go")
    parser.add_argument("--settle", type=float, default=45.0, help="seconds the page gets to draw its charts")
    args = parser.parse_args()
    if shutil.which(args.chromium) is None and not Path(args.chromium).is_file():
        sys.exit(f"screenshot_tensorboard.py: no Chromium at {args.chromium!r}; apt-get install chromium, or pass --chromium")

    with tempfile.TemporaryDirectory() as workdir:
        train_dir = args.train_logdir or train_gpt(Path(workdir))
        compare_dir = args.compare_logdir or compare_optimizers(Path(workdir))
        args.out.mkdir(parents=True, exist_ok=True)
        with TensorBoard(train_dir) as tb:
            screenshot(args.chromium, tb.url, args.out / "tensorboard_lowmem.png", 1600, 2300, args.settle)
        with TensorBoard(compare_dir) as tb:
            screenshot(args.chromium, tb.url, args.out / "tensorboard_compare.png", 1600, 800, args.settle)


if __name__ == "__main__":
    main()
