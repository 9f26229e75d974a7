"""Optimizer step time on a GPT-2-small-like parameter set, side by side with ``torch.optim.AdamW``.

Every optimizer gets its own copy of the same parameters and gradients; after a warm-up (which
includes ``torch.compile``), the steps are timed round-robin (one step of each optimizer per round)
so that every ratio compares steps taken under the same machine load. ``--clock cpu`` times the
process's CPU time instead of wall time, which other jobs on a shared machine barely disturb. The
table gives the median over the rounds, the ratio to ``AdamW(fused=True)``, the measured state bytes per parameter, and the
effective bandwidth: the bytes a step must move at the least (AdamW: read p, g, m, v and write p, m,
v = 28 bytes per fp32 parameter; AdamMini/Eve: read p, g, m and write p, m = 20) divided by the time.

Run::

    python benchmarks/step_time.py                 # GPT-2 small (124M parameters), CPU
    python benchmarks/step_time.py --layers 4 --width 512 --rounds 10
    python benchmarks/step_time.py --model hf-gpt2  # transformers' GPT-2, transposed Conv1D weights
    python benchmarks/step_time.py --device cuda    # every optimizer and backend a GPU has (Triton)
    python benchmarks/step_time.py --model hf-gpt2 --threads 1 --clock cpu --by-kind  # where the time goes
    python benchmarks/step_time.py --model llama --only "AdamW fused" int8 int4 torchao  # quantized momentum

``AdamMini int8/int4/bf16`` keep the momentum as ``exp_avg_dtype`` says (the C kernel on CPUs, Triton
on CUDA); ``torchao AdamW8bit``/``AdamW4bit`` (the ``bench`` extra) are the low-bit peers, compiled
with ``torch.compile`` in their first steps (the warm-up).

On a shared host, compare ratios taken in the same run, not milliseconds across runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_lowmem.models.gpt import GPT, GPTConfig
from lightning_lowmem.optim import AdamMini, Eve, MicroAdam
from lightning_lowmem.utils.memory import optimizer_state_bytes

#: Bytes a step must read and write per fp32 parameter, at the least (p, g and the state's codes).
MIN_BYTES_PER_PARAM = {"adamw": 28, "block": 20, "micro_adam": 12, "block bf16": 16, "block int8": 14,
                       "block int4": 13, "adamw 8bit": 16, "adamw 4bit": 14}


def make_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The model whose parameters are optimized, with fixed random gradients."""
    torch.manual_seed(0)
    if args.model == "llama":  # Llama-like nn.Linear weights: SwiGLU MLP, untied head, no biases
        from lightning_lowmem.models.llama import Llama, LlamaConfig

        heads = args.width // 64
        model = Llama(LlamaConfig(vocab_size=32000, hidden_size=args.width, intermediate_size=8 * args.width // 3 // 64 * 64,
                                  num_hidden_layers=args.layers, num_attention_heads=heads)).to(device)
    elif args.model == "hf-gpt2":  # Hugging Face's GPT-2: Conv1D weights, whose rows are columns
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64)).to(device)
    else:
        config = GPTConfig.gpt2_small(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64)
        model = GPT(config).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def candidates(device: torch.device) -> dict[str, tuple[str, Callable[[nn.Module], torch.optim.Optimizer]]]:
    """Name -> (kind for the bandwidth floor, factory)."""
    out: dict[str, tuple[str, Callable[[nn.Module], torch.optim.Optimizer]]] = {
        "AdamW fused": ("adamw", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)),
        "AdamW foreach": ("adamw", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=True)),
    }
    backends = ("torch", "compile", "triton") if device.type == "cuda" else ("torch", "compile", "native")
    for backend in backends:
        out[f"AdamMini {backend}"] = ("block", lambda m, b=backend: AdamMini(m, lr=1e-4, backend=b))
        out[f"Eve {backend}"] = ("block", lambda m, b=backend: Eve(m, lr=1e-4, backend=b))
    fast = "triton" if device.type == "cuda" else "native"
    for dtype in ("bf16", "int8", "int4"):
        out[f"AdamMini {dtype} {fast}"] = (f"block {dtype}", lambda m, d=dtype: AdamMini(m, lr=1e-4, backend=fast,
                                                                                        exp_avg_dtype=d))
    for bits in ("8bit", "4bit"):
        out[f"torchao AdamW{bits}"] = (f"adamw {bits}", lambda m, b=bits: _torchao(f"AdamW{b}", m))
    for backend in backends:
        if backend != "native":  # MicroAdam has no C kernel
            out[f"MicroAdam {backend}"] = ("micro_adam", lambda m, b=backend: MicroAdam(m, lr=1e-4, backend=b))
    return out


def _torchao(name: str, model: nn.Module) -> torch.optim.Optimizer:
    import torchao.optim  # the bench extra

    return getattr(torchao.optim, name)(model.parameters(), lr=1e-4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    device = torch.device(args.device)
    setups = {}
    for name, (kind, factory) in candidates(device).items():
        if args.only and not any(word.lower() in name.lower() for word in args.only):
            continue
        if name.startswith("torchao") and importlib.util.find_spec("torchao") is None:
            print(f"{name}: not run, `torchao` is not installed (pip install lightning-lowmem[bench])", file=sys.stderr)
            continue
        model = make_model(args, device)
        optimizer = factory(model)
        start = time.perf_counter()
        for _ in range(args.warmup):
            optimizer.step()
        sync(device)
        setups[name] = (kind, model, optimizer, time.perf_counter() - start)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, (_, _, optimizer, _) in setups.items():
            sync(device)
            start = clock()
            optimizer.step()
            sync(device)
            times[name].append(clock() - start)
    base = statistics.median(times.get("AdamW fused") or next(iter(times.values())))
    rows = []
    for name, (kind, model, optimizer, warmup_s) in setups.items():
        median = statistics.median(times[name])
        n_params = sum(p.numel() for p in model.parameters())
        rows.append({
            "optimizer": name,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
            "ms_per_step": 1e3 * median,
            "ratio_to_fused_adamw": median / base,
            "state_bytes_per_param": optimizer_state_bytes(optimizer) / n_params,
            "effective_gb_s": MIN_BYTES_PER_PARAM[kind] * n_params / median / 1e9,
            "warmup_s": warmup_s,
            "params": n_params,
        })
    return rows


def by_kind(args: argparse.Namespace) -> list[dict[str, object]]:
    """AdamMini's C kernel (``backend="native"``, CPU) timed on each kind of tensor on its own,
    against fused AdamW on the same tensors: where the step's time goes."""
    import lightning_lowmem.kernels.block_adam_native as native

    model = make_model(args, torch.device("cpu"))
    optimizer = AdamMini(model, lr=1e-4, backend="native")
    optimizer.step()
    calls = []
    kernel = native.block_adam_rows_
    native.block_adam_rows_ = lambda *a, **kw: (calls.append((a, kw)), kernel(*a, **kw))[1]
    try:
        optimizer.step()
    finally:
        native.block_adam_rows_ = kernel
    kinds: dict[str, list[tuple]] = {}
    for arguments, _ in calls:
        for item in zip(*arguments):
            rows_per_block, transposed = item[5], item[6]
            kind = ("full (AdamW's update)" if rows_per_block == 0 else
                    f"columns of Conv1D, {'heads' if rows_per_block > 1 else 'rows'}" if transposed else
                    f"{'blocks of rows (heads, tensors)' if rows_per_block > 1 else 'rows'} of Linear/Embedding")
            kinds.setdefault(kind, []).append(item)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def median_time(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(args.rounds):
            start = clock()
            fn()
            times.append(clock() - start)
        return statistics.median(times)

    rows = []
    for kind, items in kinds.items():
        columns = [list(column) for column in zip(*items)]
        ours = median_time(lambda: kernel(*columns, **calls[0][1]))
        params = [nn.Parameter(item[0].clone()) for item in items]
        for p, item in zip(params, items):
            p.grad = item[1].clone()
        adamw = torch.optim.AdamW(params, lr=1e-4, fused=True)
        adamw.step()
        base = median_time(adamw.step)
        rows.append({"tensors": kind, "params": sum(item[0].numel() for item in items), "c_kernel_ms": 1e3 * ours,
                     "fused_adamw_ms": 1e3 * base, "ratio": ours / base})
    return rows


def print_table(rows: list[dict[str, object]]) -> None:
    header = f"{'optimizer':22s} {'device':12s} {'ms/step':>9s} {'vs fused':>9s} {'B/param':>8s} {'GB/s':>7s} {'warm-up s':>10s}"
    print(f"{rows[0]['params']:,} parameters")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['optimizer']:22s} {r['device']:12s} {r['ms_per_step']:9.1f} {r['ratio_to_fused_adamw']:8.2f}x "
              f"{r['state_bytes_per_param']:8.2f} {r['effective_gb_s']:7.1f} {r['warmup_s']:10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=("gpt", "hf-gpt2", "llama"), default="gpt",
                        help="the package's GPT (nn.Linear) or Hugging Face's GPT2LMHeadModel (Conv1D; needs transformers)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768, help="a multiple of 64 (head size 64)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or the process's CPU time (robust to other jobs on the machine)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--only", nargs="*", help="run only optimizers whose name contains one of these words")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--by-kind", action="store_true",
                        help="time AdamMini's C kernel on each kind of tensor against fused AdamW on the same tensors (CPU)")
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"step_time.py: --device {args.device} needs CUDA, and torch.cuda.is_available() is False here "
                 f"(torch {torch.__version__}).")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.by_kind:
        rows = by_kind(args)
        if args.json:
            print(json.dumps(rows, indent=2))
            return
        print(f"{'tensors':44s} {'params':>12s} {'C kernel ms':>12s} {'fused AdamW ms':>15s} {'ratio':>7s}")
        for r in rows:
            print(f"{r['tensors']:44s} {r['params']:12,d} {r['c_kernel_ms']:12.1f} {r['fused_adamw_ms']:15.1f} "
                  f"{r['ratio']:6.2f}x")
        return
    rows = run(args)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
