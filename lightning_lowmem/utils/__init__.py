"""Small helpers shared by callbacks, examples and benchmarks."""

from lightning_lowmem.utils.memory import optimizer_param_count, optimizer_state_bytes, state_tensors, tensors_bytes

__all__ = ["optimizer_param_count", "optimizer_state_bytes", "state_tensors", "tensors_bytes"]
