"""The bottom layer: the reference updates, their backends, and the one function that chooses.

Nothing here imports the rest of the package. Each update (op) exists once in PyTorch
(:mod:`.block_adam`, :mod:`.micro_adam`) over the layout types of :mod:`.layout` and
:mod:`.micro_adam_layout`; the Triton kernels, the C kernel for CPUs and ``torch.compile`` are
registered implementations of it, and :func:`resolve` (:mod:`.backends`) picks one for a
``backend`` string and a device.

Example::

    >>> update = resolve("block_adam", "auto", torch.device("cpu"))
"""

from lightning_lowmem.kernels.backends import BACKENDS, check_backend, register, resolve
from lightning_lowmem.kernels.layout import RowLayout, as_rows, state_dtype
from lightning_lowmem.kernels.micro_adam_layout import MicroAdamLayout

__all__ = ["BACKENDS", "MicroAdamLayout", "RowLayout", "as_rows", "check_backend", "register", "resolve", "state_dtype"]
