"""The collective timeout of ``LowMemFSDPStrategy``: an argument, an environment variable, or the default.

A rank that hangs (a stuck data loader, a deadlock, a frozen node) makes every other rank wait in
its next collective until this timeout, then fail. A rank that dies is noticed sooner (its
connections close). ``Trainer(strategy="lowmem_fsdp")`` takes the timeout from the environment
variable :data:`TIMEOUT_ENV` (seconds), so it can be set without writing the strategy's class.

Example::

    $ LOWMEM_FSDP_TIMEOUT=300 python train.py     # give up 5 minutes after a rank stops answering
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

#: Environment variable read when ``LowMemFSDPStrategy(timeout=None)``: the timeout in seconds.
TIMEOUT_ENV = "LOWMEM_FSDP_TIMEOUT"


def collective_timeout(timeout: timedelta | float | None) -> timedelta:
    """``timeout`` (a ``timedelta`` or seconds), else ``$LOWMEM_FSDP_TIMEOUT`` seconds, else 30 minutes.

    Raises:
        ValueError: for a timeout, or a value of the variable, that is not a positive number of seconds.
    """
    source = "timeout"
    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw is None or raw.strip() == "":
            return default_pg_timeout
        source = f"${TIMEOUT_ENV}"
        try:
            timeout = float(raw)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}.") from None
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{source} must be a positive, finite number of seconds, got {timeout!r}.")
    return timedelta(seconds=seconds)
