"""Start N CPU processes of a script the way a cluster launcher would (LOCAL_RANK, MASTER_PORT, ...),
and end them (:func:`end_worker`).

Lightning's environment then sees processes "created externally" and does not fork its own; a hang
in a collective ends at ``timeout`` (every process is killed) instead of stalling the test run.

Every multi-process worker ends with :func:`end_worker`: a last barrier, then ``os._exit``. A worker
that returned normally instead tore gloo down (``destroy_process_group``, then the interpreter's
finalization and C++ static destructors, which free the process group, its worker threads and the
async work FSDP2 keeps) while its peer did the same and closed its sockets and, on rank 0, the
TCP store. A barrier before ``destroy_process_group`` only lines up where the two teardowns start,
not where they end, and about once in 60 runs rank 1 aborted in that window with "terminate called
without an active exception" (``std::terminate`` from a C++ destructor, not a Python error). With
``os._exit`` no destructor runs at all: there is no teardown left to race.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, args: list[str], nprocs: int, timeout: float) -> float:
    """Run ``script args`` in ``nprocs`` processes; raise with their output if any fails. Returns seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    if nprocs > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NODE_RANK="0", WORLD_SIZE=str(nprocs))
    logs, procs = [], []
    start = time.monotonic()
    for rank in range(nprocs):
        log = tempfile.TemporaryFile(mode="w+")
        rank_env = {**env, "LOCAL_RANK": str(rank)} if nprocs > 1 else env
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=rank_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        logs.append(log)
    failed = None
    while failed is None and any(proc.poll() is None for proc in procs):
        bad = [rank for rank, proc in enumerate(procs) if proc.poll() not in (None, 0)]
        if bad:
            failed = f"rank {bad[0]} exited with {procs[bad[0]].returncode}"
        elif time.monotonic() - start > timeout:
            failed = f"timed out after {timeout:.0f} s"
        time.sleep(0.2)
    bad = [rank for rank, proc in enumerate(procs) if proc.poll() not in (None, 0)]
    if failed is None and bad:
        failed = f"rank {bad[0]} exited with {procs[bad[0]].returncode}"
    for proc in procs:  # a peer of a failed rank may wait forever in a collective
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if failed:
        output = []
        for rank, log in enumerate(logs):
            log.seek(0)
            output.append(f"---- rank {rank} ----\n{log.read()[-6000:]}")
        raise RuntimeError(f"{script.name} {' '.join(args)}: {failed}\n" + "\n".join(output))
    return time.monotonic() - start


def end_worker(code: int = 0) -> NoReturn:
    """End this worker process now with ``code``, without tearing down gloo or the interpreter.

    With ``code == 0`` every rank first meets in a barrier (so no rank leaves while its peer still
    needs it for a collective); on an error (``code != 0``) it leaves at once, since its peer may be
    stuck in a collective that will never complete. Results must be written (files closed) before.
    Loggers are finalized by ``Trainer.fit`` itself.

    Example::

        if __name__ == "__main__":
            try:
                main()
            except BaseException:
                traceback.print_exc()
                end_worker(1)
            end_worker(0)
    """
    import torch.distributed as dist

    if code == 0 and dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
