"""The documentation runs: every command and snippet in README.md and docs/*.md, so the docs cannot rot.

What each kind of fenced block must do:

* ```` ```bash ````: every command runs here, exits 0 and prints its key line (:data:`EXPECTED`; a
  new command needs an entry there), or another test file that checks more runs that very command. ``python`` and ``.venv/bin/python`` are this interpreter, and
  ``lowmem`` is the console script's function (``lightning_lowmem.cli:main``, checked against
  ``pyproject.toml``), called in this process. Examples run in a scratch directory with a link to
  ``examples/``, with overrides that keep them short. The README's two set-up commands create a
  virtual environment and are not re-run: CI runs the test command itself (``.ci/run`` must contain
  it verbatim), and the main job's python part runs with overrides for a short run.
* ```` ```python ````: every block runs, in order, one namespace per file, with ``model`` a tiny GPT,
  in a scratch directory. A block after ``<!-- not run: reason -->`` is skipped: it needs GPUs or
  several machines.
* ```` ```console ````: transcripts. Those of ``lowmem`` run and their output must be as shown; the
  others (torchrun, SLURM, pip) need more than this machine (GPUs, several machines, the network)
  and are not run: :data:`NOT_RUN` says why for each program.
* ```` ```text ```` after ``<!-- output of: COMMAND -->``: every line appears in COMMAND's output.
* ```` ```yaml ```` with an ``optim`` key: a valid ``OptimConfig``.

And: tables that mirror code (config keys, strategy options, callback arguments, presets, TensorBoard
tags) match it, relative links and anchors resolve (a page still being written only warns), and
``docs/api.md`` is what ``docs/gen_api.py`` writes.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import inspect
import io
import os
import re
import shlex
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
SETUP = 'python3 -m venv .venv && .venv/bin/pip install -q -c constraints-cpu.txt -e ".[dev]" && '
MAIN_JOB = ".venv/bin/python examples/train_gpt.py"
TEST_JOB = ".venv/bin/python -m pytest -q"

#: A short train_gpt.py run: a 1-layer model, 4 steps (later key=value arguments win).
SHORT_TRAIN = (
    "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "data.block_size=32",
    "data.batch_size=8", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
    "optim.scheduler.warmup_steps=1", "log_dir={tmp}/runs",
)

@dataclasses.dataclass(frozen=True)
class Expect:
    """What a documented ``bash`` command must do here."""

    key_line: str = ""  # a regex its output must contain
    extra: tuple[str, ...] = ()  # arguments appended to keep the run short (the last value wins)
    needs: str | None = None  # a module it needs: skipped without it
    run_by: str | None = None  # another test file that runs this very command (and checks more)


#: Every documented ``bash`` command other than the README's set-up commands.
EXPECTED: dict[str, Expect] = {
    "lowmem estimate llama2-7b": Expect(r"AdamMini \(adam_mini\)\s+26\.96\s+4\.001\s+49\.99%"),
    "lowmem plan gpt2": Expect(r"Block plan \(adam_mini\): 148 tensors"),
    "python examples/compare_optimizers.py --steps 20": Expect(run_by="tests/test_examples_hf.py"),
    "python examples/hf_llama.py": Expect(run_by="tests/test_examples_hf.py"),
    "python examples/train_fsdp_cpu.py --steps 20": Expect(
        r"validation loss: sharded model \d+\.\d+, checkpoint in a plain model", ("--steps", "2", "--out", "{tmp}/fsdp")),
    "python examples/train_gpt.py optim.name=eve optim.lr=1e-3 callbacks.trajectory=null trainer.max_steps=100": Expect(
        r"optimizer state: eve .* bytes/param", SHORT_TRAIN),
}

#: Programs of ``console`` blocks that are not run, and why.
NOT_RUN = {
    "torchrun": "needs several machines with GPUs",
    "sbatch": "needs a SLURM cluster",
    "cat": "shows a file of the SLURM example",
    "pip": "needs the network",
}

#: Files the ``console`` transcripts read (they exist where the transcript was taken).
CONSOLE_FILES = {"custom/config.json": '{"model_type": "my_model", "hidden_size": 768}'}

#: Tags of callbacks.md that a short single-process run without spikes does not write.
TAGS_NOT_IN_A_SHORT_RUN = {
    "lowmem/state/rank_mb", "lowmem/state/rank_min_mb", "lowmem/spikes/loss", "lowmem/spikes/grad_norm",
    "lowmem/spikes/z", "lowmem/spikes/events",
    "lowmem/state/mb_by_kind/row",  # how loggers other than TensorBoard name a series
}


# ---- reading the docs ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str | None  # the HTML comment on the line before the fence

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path, lang: str | None = None) -> list[Block]:
    """The fenced blocks of a Markdown file (of one language if given)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = re.match(r"^<!--\s*(.*?)\s*-->$", lines[i - 1].strip()) if i else None
        found.append(Block(path, i + 1, fence.group(1), "\n".join(lines[i + 1 : end]), marker and marker.group(1)))
        i = end + 1
    return [b for b in found if lang is None or b.lang == lang]


def commands(block: Block) -> list[str]:
    """The commands of a ``bash`` block: one per line (``\\`` continues), comments and blank lines left out."""
    text = block.text.replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def documented_commands() -> dict[str, str]:
    """``command -> where it is first documented`` for every bash command but the set-up ones."""
    found: dict[str, str] = {}
    for path in DOCS:
        for block in blocks(path, "bash"):
            for command in commands(block):
                if not command.startswith(SETUP):
                    found.setdefault(command, block.where)
    return found


def scratch_dir(tmp_path: Path) -> Path:
    """A working directory where ``examples/...`` resolves to the repository's examples."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    return tmp_path


def run_lowmem(argv: list[str]) -> tuple[int, str]:
    """``lowmem ARGV`` in this process: its exit status and its stdout and stderr together."""
    from lightning_lowmem.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            status = main(argv)
        except SystemExit as exit_:  # argparse's usage errors
            status = exit_.code
    return status or 0, out.getvalue()


def run_python(argv: list[str], cwd: Path, timeout: float = 240) -> str:
    """``python ARGV`` with this interpreter in ``cwd``; its stdout and stderr (asserts exit 0)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the checkout, whatever is installed
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"python {shlex.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def run_command(command: str, extra: tuple[str, ...], cwd: Path) -> str:
    argv = shlex.split(command) + [arg.format(tmp=cwd) for arg in extra]
    program, args = argv[0], argv[1:]
    if program in ("lowmem", ".venv/bin/lowmem"):
        status, out = run_lowmem(args)
        assert status == 0, f"{command} exited with {status}:\n{out}"
        return out
    assert program in ("python", ".venv/bin/python"), f"{command}: only python and lowmem commands are documented as bash"
    return run_python(args, cwd)


# ---- the README's set-up commands ----------------------------------------------------------------


def test_readme_starts_with_exactly_two_setup_commands():
    setup = [b.text for b in blocks(README, "bash") if b.text.startswith(SETUP)]
    assert setup == [SETUP + MAIN_JOB, SETUP + TEST_JOB]
    assert [b.text for b in blocks(README, "bash")][:2] == setup  # they come first
    for path in DOCS:  # where the docs repeat them, they are the same
        for block in blocks(path, "bash"):
            if "python3 -m venv" in block.text:
                assert block.text in setup, f"{block.where} differs from the README's set-up commands"


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert SETUP + TEST_JOB in ci


def test_lowmem_is_the_console_script_called_here():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["lowmem"] == "lightning_lowmem.cli:main"


def test_readme_main_job_short_run(tmp_path):
    """The README's main job with overrides for a short run: its summary, checkpoints and TensorBoard charts."""
    cwd = scratch_dir(tmp_path)
    overrides = [arg.format(tmp=cwd) for arg in SHORT_TRAIN] + [
        "callbacks.state_monitor.every_n_steps=2", "callbacks.trajectory.every_n_steps=2",
        "callbacks.diagnostics.every_n_steps=2",
    ]
    out = run_python([MAIN_JOB.split(" ", 1)[1], *overrides], cwd)
    assert re.search(r"final validation loss: \d+\.\d+ \(\d+\.\d+ bits per byte\)", out), out
    assert re.search(r"optimizer state: adam_mini [\d.]+ MB = 4\.\d\d bytes/param, fp32 AdamW [\d.]+ MB = 8\.00", out)
    distance = re.search(r"distance to AdamW's trajectory \(shadow\) at step 4: relative L2 (\d+\.\d+)", out)
    assert distance and 0 < float(distance.group(1)) < 1, out
    assert "loss spikes: 0 (action: skip)" in out

    # The summary shown in the quickstart has the lines of a real run (numbers aside).
    (sample,) = [b for path in DOCS for b in blocks(path, "text") if b.marker == "output of the main job"]
    for line in sample.text.splitlines():
        pattern = re.sub(r"\d+(?:\\\.\d+)?", lambda _: r"\d+(?:\.\d+)?", re.escape(line)).replace("runs", r"\S*runs")
        assert re.search(pattern, out), f"{sample.where}: no line like {line!r} in the output:\n{out}"

    # Every TensorBoard tag of docs/callbacks.md is written, and every written lowmem tag is documented.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = Path(re.search(r"TensorBoard logs: (\S+)", out).group(1))
    tags = set()
    for run in [log_dir, *(d for d in log_dir.iterdir() if d.name.startswith("lowmem_"))]:  # series are runs
        events = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
        events.Reload()
        tags |= {t.removesuffix("/text_summary") for kind in ("scalars", "histograms", "tensors") for t in events.Tags()[kind]}
    written = {t for t in tags if t.startswith("lowmem/")}
    assert "custom_scalars__config__" in tags  # the Custom Scalars layout
    documented = set(re.findall(r"`(lowmem/[\w/<>.]+)`", (ROOT / "docs" / "callbacks.md").read_text(encoding="utf-8")))
    patterns = {tag: re.compile(re.sub(r"<\w+>", "[^/]+", tag) + "$") for tag in documented}
    for tag, pattern in patterns.items():
        if tag not in TAGS_NOT_IN_A_SHORT_RUN:
            assert any(pattern.match(t) for t in written), f"docs/callbacks.md names {tag}, which the run did not write"
    for tag in written:
        assert any(p.match(tag) for p in patterns.values()), f"{tag} is written but not in docs/callbacks.md"


# ---- every other command -------------------------------------------------------------------------


def test_every_documented_command_has_an_expectation():
    documented = documented_commands()
    missing = [f"{where}: {command}" for command, where in documented.items() if command not in EXPECTED]
    assert not missing, "add these documented commands to EXPECTED in tests/test_docs.py:\n" + "\n".join(missing)
    stale = [command for command in EXPECTED if command not in documented]
    assert not stale, f"no longer documented, remove from EXPECTED: {stale}"


@pytest.mark.parametrize("command", list(EXPECTED), ids=[" ".join(c.split()[:3]) for c in EXPECTED])
def test_documented_command_runs(command, tmp_path):
    expect = EXPECTED[command]
    if expect.run_by is not None:  # run there, with more checks: only make sure it is this command
        assert f'"{command}"' in (ROOT / expect.run_by).read_text(encoding="utf-8"), f"{expect.run_by} must run `{command}`"
        return
    if expect.needs is not None:
        pytest.importorskip(expect.needs, reason=f"`{command}` needs {expect.needs}")
    out = run_command(command, expect.extra, scratch_dir(tmp_path))
    assert re.search(expect.key_line, out), f"`{command}` did not print {expect.key_line!r}:\n{out[-4000:]}"


def test_console_transcripts(tmp_path, monkeypatch):
    """``$ lowmem ...`` transcripts run and print what they show; other programs say why they are not run."""
    monkeypatch.chdir(tmp_path)
    for name, content in CONSOLE_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    checked = 0
    for path in DOCS:
        for block in blocks(path, "console"):
            parts = re.split(r"^\$ ", block.text, flags=re.M)
            assert parts[0] == "", f"{block.where}: a console block starts with `$ command`"
            for part in parts[1:]:
                command, _, shown = part.partition("\n")
                argv = shlex.split(command)
                if argv[0] != "lowmem":
                    assert argv[0] in NOT_RUN, f"{block.where}: `{command}` is not run; say why in NOT_RUN"
                    continue
                head = None
                if "|" in argv:  # `| head -N`
                    pipe = argv.index("|")
                    assert argv[pipe + 1 :][:1] == ["head"], f"{block.where}: only `| head -N` is supported"
                    head, argv = int(argv[pipe + 2].lstrip("-")), argv[:pipe]
                _, out = run_lowmem(argv[1:])
                if head is not None:
                    out = "".join(out.splitlines(keepends=True)[:head])
                assert out.rstrip("\n") == shown.rstrip("\n"), f"{block.where}: `{command}` now prints:\n{out}"
                checked += 1
    assert checked >= 5


def test_shown_outputs_are_real(tmp_path):
    """A ``text`` block after ``<!-- output of: COMMAND -->`` holds lines COMMAND really prints."""
    shown = [b for path in DOCS for b in blocks(path, "text") if b.marker and b.marker.startswith("output of:")]
    assert shown
    for block in shown:
        command = block.marker.removeprefix("output of:").strip()
        out = run_command(command, (), scratch_dir(tmp_path)).splitlines()
        for line in block.text.splitlines():
            assert line in out, f"{block.where}: `{command}` no longer prints {line!r}"


# ---- python snippets -----------------------------------------------------------------------------


def tiny_model() -> torch.nn.Module:
    from lightning_lowmem.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig.tiny())


PYTHON_DOCS = [path for path in DOCS if blocks(path, "python")]


@pytest.fixture
def one_thread():
    """One torch thread, as the examples use: on a busy 2-core machine a second one only spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("path", PYTHON_DOCS, ids=[str(p.relative_to(ROOT)) for p in PYTHON_DOCS])
def test_python_snippets_run(path, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(scratch_dir(tmp_path))
    namespace = {"__name__": "__doc_snippet__", "model": tiny_model()}
    ran = 0
    for block in blocks(path, "python"):
        if block.marker and block.marker.startswith("not run:"):
            assert block.marker.removeprefix("not run:").strip(), f"{block.where}: say why it is not run"
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers and the like
            # dont_inherit: run as a reader's file would, without this module's `from __future__ import annotations`
            exec(compile(block.text, block.where, "exec", dont_inherit=True), namespace)  # noqa: S102 - our own docs
        ran += 1
    assert ran


def test_these_docs_have_runnable_python():
    names = {path.name for path in PYTHON_DOCS}
    assert {"README.md", "quickstart.md", "optimizers.md", "partitioning.md", "callbacks.md"} <= names


def test_yaml_blocks_are_valid_configs():
    from lightning_lowmem import OptimConfig

    checked = 0
    for path in DOCS:
        for block in blocks(path, "yaml"):
            cfg = OmegaConf.create(block.text)
            if "optim" in cfg:
                OptimConfig.from_any(cfg.optim)
                checked += 1
    assert checked


# ---- tables that mirror the code -----------------------------------------------------------------


def table_after(path: Path, heading: str, first_header: str) -> list[list[str]]:
    """The rows (lists of cells) of the first table after ``heading`` whose header starts with ``first_header``."""
    text = path.read_text(encoding="utf-8")
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and line.strip("| ").startswith(first_header))
    rows = []
    for line in lines[start + 2 :]:  # after the header and the |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def cell_value(cell: str) -> object:
    """A table cell like `100`, `"skip"`, `None`, `(0.9, 0.999)`, `null` or `[a, b]` as a Python value."""
    text = cell.strip("`")
    try:
        return ast.literal_eval(text)  # Python: 100, "skip", None, (0.9, 0.999)
    except (ValueError, SyntaxError):
        value = yaml.safe_load(text)  # YAML, as in a config: null, [0.9, 0.999], auto
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)  # YAML 1.1 reads 1e-08 as a string
    return value


def test_quickstart_config_table_matches_optim_config():
    from lightning_lowmem import OptimConfig, SchedulerConfig

    rows = table_after(ROOT / "docs" / "quickstart.md", "Every key of the config", "key")
    documented = {row[0].strip("`"): cell_value(row[1]) for row in rows}
    fields = {f.name: f for f in dataclasses.fields(OptimConfig) if f.name != "scheduler"}
    fields.update({f"scheduler.{f.name}": f for f in dataclasses.fields(SchedulerConfig)})
    assert list(documented) == list(fields)
    defaults = {**dataclasses.asdict(OptimConfig()), **{f"scheduler.{k}": v for k, v in dataclasses.asdict(SchedulerConfig()).items()}}
    for key, value in documented.items():
        expected = defaults[key]
        expected = list(expected) if isinstance(expected, tuple) else expected
        assert value == expected, f"quickstart.md gives {key} the default {value!r}, the code {expected!r}"


def test_distributed_options_table_matches_the_strategy():
    from lightning_lowmem import LowMemFSDPStrategy

    rows = table_after(ROOT / "docs" / "distributed.md", "## Options", "argument")
    assert [row[0].strip("`") for row in rows] == list(inspect.signature(LowMemFSDPStrategy).parameters)


@pytest.mark.parametrize("name", ["OptimizerStateMonitor", "TrajectoryDistance", "LossSpikeMonitor", "OptimizerDiagnostics"])
def test_callback_argument_tables_match_the_signatures(name):
    import lightning_lowmem.callbacks as callbacks

    rows = table_after(ROOT / "docs" / "callbacks.md", f"## {name}", "argument")
    params = inspect.signature(getattr(callbacks, name)).parameters
    assert [row[0].strip("`") for row in rows] == list(params)
    for row in rows:
        default = params[row[0].strip("`")].default
        if default is inspect.Parameter.empty:
            assert row[1] == "(required)"
        elif callable(default):
            assert row[1].strip("`") == default.__name__
        else:
            assert cell_value(row[1]) == default, f"{name}({row[0]}): docs {row[1]}, code {default!r}"


def test_partitioning_preset_table_matches_the_presets():
    from lightning_lowmem.partition.presets import PRESET_TABLES
    from lightning_lowmem.partition.structure import ROLES

    rows = table_after(ROOT / "docs" / "partitioning.md", "## Presets", "roles")
    presets = ["adam_mini", "adam_mini_paper", "eve"]
    covered = []
    for row in rows:
        roles = re.findall(r"`(\w+)`", row[0])
        covered += roles
        for preset, cell in zip(presets, row[1:4]):
            kinds = [kind.strip() for kind in cell.split(",")]
            for role in roles:
                actual = list(PRESET_TABLES[preset].qkv) if role == "qkv" else [PRESET_TABLES[preset].roles[role]]
                assert kinds == actual, f"partitioning.md: {preset} gives {role} {kinds}, the code {actual}"
    assert sorted(covered) == sorted(ROLES)


# ---- links and the API reference -----------------------------------------------------------------


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of a Markdown file."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in headings}


#: Pages other people are writing: a link to one is only checked once it exists (until then, a warning).
PENDING_PAGES = {"docs/benchmarks.md": "written by the benchmarks' owner"}


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_relative_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        pending = str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else None
        if not resolved.exists() and pending in PENDING_PAGES:
            warnings.warn(f"{path.relative_to(ROOT)} links to {target}, not there yet ({PENDING_PAGES[pending]})")
            continue
        assert resolved.exists(), f"{path.relative_to(ROOT)} links to {target}, which does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{path.relative_to(ROOT)} links to {target}: no such heading"


def load_gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_up_to_date():
    gen_api = load_gen_api()
    assert (ROOT / "docs" / "api.md").read_text(encoding="utf-8") == gen_api.render(), (
        "docs/api.md is out of date: run `python docs/gen_api.py`"
    )


def test_api_reference_covers_every_subpackage():
    import pkgutil

    import lightning_lowmem

    gen_api = load_gen_api()
    packages = {"lightning_lowmem"} | {
        info.name for info in pkgutil.walk_packages(lightning_lowmem.__path__, "lightning_lowmem.") if info.ispkg
    }
    with_all = {name for name in packages if hasattr(importlib.import_module(name), "__all__")}
    assert with_all <= set(gen_api.MODULES), f"add to docs/gen_api.py MODULES: {sorted(with_all - set(gen_api.MODULES))}"
    for module_name in gen_api.MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            assert hasattr(module, name), f"{module_name}.__all__ names {name}, which it does not define"
