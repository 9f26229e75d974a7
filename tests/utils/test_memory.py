"""Tests of the optimizer state memory measurement."""

import pytest
import torch

from lightning_lowmem.utils import optimizer_param_count, optimizer_state_bytes, tensors_bytes


def test_tensor_bytes_are_numel_times_element_size():
    tensors = [torch.zeros(10), torch.zeros(3, dtype=torch.bfloat16), torch.zeros(5, dtype=torch.uint8)]
    assert tensors_bytes(tensors) == 40 + 6 + 5


def test_view_and_base_counted_once():
    base = torch.zeros(4, 6)
    assert tensors_bytes([base, base[1:3], base.t(), base.view(-1)]) == 96
    assert tensors_bytes([base[1:3]]) == 48  # a view alone counts its own elements
    assert tensors_bytes([base, base]) == 96


def test_disjoint_views_of_one_buffer_each_count():
    flat = torch.zeros(100)
    assert tensors_bytes([flat[:30], flat[30:50]]) == 200
    assert tensors_bytes([flat[:30], flat[20:50]]) == 200  # overlap counted once


def test_empty_and_meta_tensors():
    assert tensors_bytes([torch.zeros(0), torch.zeros(0)]) == 0
    assert tensors_bytes([torch.zeros(3, device="meta"), torch.zeros(3, device="meta")]) == 24


def test_adamw_state_is_eight_bytes_per_param_plus_steps():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2, bias=False))
    optimizer = torch.optim.AdamW(model.parameters())
    assert optimizer_state_bytes(optimizer) == 0
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    params = 8 * 4 + 4 + 4 * 2
    assert optimizer_param_count(optimizer) == params
    assert optimizer_state_bytes(optimizer) == 8 * params + 3 * 4  # exp_avg, exp_avg_sq, a float32 step each


def test_shared_state_tensor_and_nested_containers():
    p, q = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5))
    optimizer = torch.optim.SGD([p, q], lr=0.1)
    shared = torch.zeros(10)
    optimizer.state[p] = {"buf": shared[:5], "ring": [torch.zeros(2, dtype=torch.int16)], "n": 3}
    optimizer.state[q] = {"buf": shared[5:], "more": {"x": shared}}
    assert optimizer_state_bytes(optimizer) == 40 + 4


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed for DTensor")
def test_dtensor_counts_the_local_shard(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        dt = distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)])
        assert tensors_bytes([dt]) == 96
    finally:
        torch.distributed.destroy_process_group()
