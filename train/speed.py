"""Training throughput on this machine: images/s of one whole-backbone training step.

Usage (from the repository root):

    OMP_WAIT_POLICY=PASSIVE python train/speed.py                      # MobileNetV2 and EfficientNet-Lite0, 4 sides
    OMP_WAIT_POLICY=PASSIVE python train/speed.py --arch mobilenet_v2 --sizes 160 224 --compile

Each row: backbone, input side, memory format, whether `torch.compile` was used, images/s over
`--steps` timed steps (after `--warmup` untimed ones) of forward + backward + AdamW step on a
batch of random inputs with every layer trainable and BatchNorm in train mode (the cost of a
`core.train` whole-backbone epoch without data loading), and the head-only step (backbone
frozen and in eval mode, as in the warm-up epoch). Random weights: only the arithmetic matters.
The load average is printed beside the figures: other work on the machine lowers them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.models import build_model, head_parameters  # noqa: E402
from core.tasks import get_task  # noqa: E402


def step_rate(model: nn.Module, size: int, batch: int, steps: int, warmup: int, channels_last: bool,
              head_only: bool) -> float:
    """Images per second of training steps at one input side."""
    head = {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        p.requires_grad = (id(p) in head) or not head_only
    model.train()
    if head_only:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=memory)
    y = torch.randint(0, 2, (batch,))
    loss_fn = nn.CrossEntropyLoss()

    def one() -> None:
        loss = loss_fn(model(x)[:, :2], y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        one()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["mobilenet_v2", "efficientnet_lite0"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 160, 192, 224])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-contiguous", action="store_true", help="skip the contiguous (NCHW) rows")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models (slow to start)")
    parser.add_argument("--head-only", action="store_true", help="also time the head-only (warm-up) step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = get_task("ct_covid")
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "batch": args.batch,
                      "load_average_before": os.getloadavg()}))
    for arch in args.arch:
        for size in args.sizes:
            variants = [(True, False, False)] + ([] if args.no_contiguous else [(False, False, False)])
            if args.compile:
                variants.append((True, True, False))
            if args.head_only:
                variants.append((True, False, True))
            for channels_last, compiled, head_only in variants:
                torch.manual_seed(0)
                model = build_model(spec, None, arch=arch)
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)
                started = time.perf_counter()
                runner = torch.compile(model) if compiled else model
                rate = step_rate(runner, size, args.batch, args.steps, args.warmup + (2 if compiled else 0),
                                 channels_last, head_only)
                print(json.dumps({"arch": arch, "size": size, "channels_last": channels_last, "compiled": compiled,
                                  "step": "head only" if head_only else "whole backbone",
                                  "images_per_s": round(rate, 1), "seconds": round(time.perf_counter() - started, 1),
                                  "load_average": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
