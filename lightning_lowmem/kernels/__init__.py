"""Backends for the optimizer updates: dispatch between the torch reference and compiled kernels."""

from lightning_lowmem.kernels.dispatch import BACKENDS, check_backend, resolve_update

__all__ = ["BACKENDS", "check_backend", "resolve_update"]
