"""A short one-device ``lowmem_fsdp`` training run: does it train, how fast, where does the optimizer step.

Trains a GPT (6 layers, width 512, random tokens: nothing to download) for ``--steps`` optimizer
steps with ``Trainer(strategy=LowMemFSDPStrategy(...), devices=1)`` and AdamMini (``backend="auto"``),
and prints one JSON line: the device, the first and last training loss, the time per step after
the first ``--warmup`` steps, the peak GPU memory, and how many tensors the C kernel for CPUs
stepped (with ``--cpu-offload`` the optimizer state lives in CPU memory and the C kernel steps it).
Exits with status 1 if the loss is not finite or its last three values are not below its first three, 2 if CUDA is asked for and absent.

    python benchmarks/fsdp_one_gpu.py --device cuda --precision bf16-mixed
    python benchmarks/fsdp_one_gpu.py --device cuda --precision bf16-mixed --cpu-offload
    python benchmarks/fsdp_one_gpu.py --device cpu --steps 4 --layers 1 --width 64   # a check of the script
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--precision", default="bf16-mixed", help="Lightning precision (default bf16-mixed)")
    parser.add_argument("--cpu-offload", action="store_true", help="LowMemFSDPStrategy(cpu_offload=True) (CUDA only)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (compilation)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512, help="a multiple of 64 (head size 64)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"fsdp_one_gpu.py: --device cuda needs CUDA, and torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}).", file=sys.stderr)
        return 2
    if args.cpu_offload and args.device != "cuda":
        print("fsdp_one_gpu.py: --cpu-offload needs --device cuda.", file=sys.stderr)
        return 2

    import lightning as L

    import lightning_lowmem.kernels.block_adam_native as native
    from lightning_lowmem import AdamMini, LowMemFSDPStrategy
    from lightning_lowmem.models import GPT, GPTConfig

    native_tensors = []
    kernel = native.block_adam_rows_

    def counting_kernel(params, *rest, **kwargs):
        native_tensors.append(len(params))
        return kernel(params, *rest, **kwargs)

    native.block_adam_rows_ = counting_kernel

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.start = 0.0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))
            if trainer.global_step == args.warmup:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                self.start = time.perf_counter()

    class LitGPT(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = GPT(GPTConfig.gpt2_small(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64,
                                                block_size=128))

        def training_step(self, batch, batch_idx):
            return self.gpt(batch[:, :-1], batch[:, 1:])[1]

        def configure_optimizers(self):
            return AdamMini(self.gpt, lr=1e-3, weight_decay=0.1)

    torch.manual_seed(0)
    vocab = GPTConfig.gpt2_small().vocab_size
    # a learnable stream: every sequence counts up from a random token
    starts = torch.randint(0, vocab, (args.steps * 8, 1))
    tokens = (starts + torch.arange(129)) % vocab
    loader = torch.utils.data.DataLoader(tokens, batch_size=8)
    timer = Timer()
    trainer = L.Trainer(accelerator=args.device, devices=1, strategy=LowMemFSDPStrategy(cpu_offload=args.cpu_offload),
                        precision=args.precision, max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(LitGPT(), loader)
    if args.device == "cuda":
        torch.cuda.synchronize()
    timed = max(1, args.steps - args.warmup)
    result = {
        "run": f"lowmem_fsdp {args.precision}" + (" cpu_offload" if args.cpu_offload else ""),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "steps": args.steps,
        "loss_first": timer.losses[0],
        "loss_last": timer.losses[-1],
        "ms_per_step": 1e3 * (time.perf_counter() - timer.start) / timed,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if args.device == "cuda" else 0.0,
        "native_kernel_tensors": sum(native_tensors),
    }
    print(json.dumps(result))
    head, tail = timer.losses[:3], timer.losses[-3:]
    trained = all(math.isfinite(x) for x in timer.losses) and sum(tail) / len(tail) < sum(head) / len(head)
    return 0 if trained else 1


if __name__ == "__main__":
    sys.exit(main())
