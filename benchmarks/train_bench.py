"""Fine-tuning and evaluation throughput of clmerge's step against the reference's plain fp32 loop.

One process, one model (open_clip, random init), one batch of synthetic images, side by side: every
round times each variant for `--steps` optimizer steps in turn (after `--warmup` untimed steps each), and
the median over `--rounds` rounds is printed as images/s with the ratio to the reference.

Variants (`--variants`, comma-separated):
  ref                    the reference's loop: fp32, torch.optim.AdamW defaults, no autocast
  PREC-IMPL[-cl][-compile]
                         clmerge's `Stepper` (training/optim.py): PREC in fp32|bf16|fp16, IMPL the AdamW
                         kernels (plain|foreach|fused), -cl channels-last images and weights, -compile
                         torch.compile of the image tower

    .venv/bin/python benchmarks/train_bench.py --threads 2                       # CPU: ViT-B/32, batch 32
    .venv/bin/python benchmarks/train_bench.py --device cuda --model ViT-B-16 --batch 128 \\
        --variants ref,fp32-fused,bf16-fused,bf16-fused-compile                  # H100 / H200
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import open_clip
import torch
import torch.nn.functional as F

from clmerge.config import FinetuneConfig
from clmerge.models.heads import embed
from clmerge.models.tower import freeze_all_but_tower
from clmerge.training.distributed import Shard
from clmerge.training.optim import Stepper, make_optimizer
from clmerge.training.precision import autocast, native_bf16

NUM_CLASSES = 100


@dataclass
class Setup:
    """A model and its optimizer step, ready to time."""

    step: Callable[[], None]
    evaluate: Callable[[], None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(variant: str, args: argparse.Namespace, images: torch.Tensor, targets: torch.Tensor,
          head: torch.Tensor, device: torch.device) -> Setup:
    """The training step and evaluation pass of `variant` on a freshly built model (same init every time)."""
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None, device=device)
    params = freeze_all_but_tower(model)
    parts = variant.split("-")
    if "cl" in parts:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if "compile" in parts:
        model.visual.compile()
    cfg = FinetuneConfig(lr=1e-5, weight_decay=0.1, batch_size=len(targets), precision=parts[0],
                         optimizer_impl=parts[1] if len(parts) > 1 else "plain")
    precision = "fp32" if variant == "ref" else parts[0]

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        features = embed(model, x)
        with torch.autocast(device.type, enabled=False):
            return F.cross_entropy(features @ head.T, y)

    if variant == "ref":
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)

        def step() -> None:
            optimizer.zero_grad()
            loss = F.cross_entropy(embed(model, images) @ head.T, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
    else:
        stepper = Stepper(params, make_optimizer(params, cfg, device), cfg, precision, device, Shard())

        def step() -> None:
            stepper.step(images, targets, len(targets), loss_fn)

    @torch.inference_mode()
    def evaluate() -> None:
        with autocast(precision, device):
            (embed(model, images) @ head.T).argmax(1).cpu()

    model.train()
    return Setup(step=step, evaluate=evaluate)


def timed(fn: Callable[[], None], times: int, device: torch.device) -> float:
    """Seconds per call of `fn`, over `times` calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(times):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="ref,fp32-plain,fp32-foreach,fp32-fused,fp32-fused-cl")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per variant and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-eval", action="store_true", help="time training only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    size = open_clip.get_model_config(args.model)["vision_cfg"]["image_size"]
    images = torch.randn(args.batch, 3, size, size, generator=generator).to(device)
    targets = torch.randint(NUM_CLASSES, (args.batch,), generator=generator).to(device)
    head = 100 * F.normalize(torch.randn(NUM_CLASSES, open_clip.get_model_config(args.model)["embed_dim"],
                                         generator=generator), dim=-1).to(device)
    variants = args.variants.split(",")
    setups = {name: build(name, args, images, targets, head, device) for name in variants}
    for setup in setups.values():
        timed(setup.step, args.warmup, device)
        if not args.no_eval:
            timed(setup.evaluate, args.warmup, device)
    train: dict[str, list[float]] = {name: [] for name in variants}
    infer: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, setup in setups.items():
            train[name].append(args.batch / timed(setup.step, args.steps, device))
            if not args.no_eval:
                infer[name].append(args.batch / timed(setup.evaluate, args.steps, device))
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"{args.model} {size} px, batch {args.batch}, {what}, native bf16: {native_bf16(device)}; "
          f"median of {args.rounds} rounds x {args.steps} steps (images/s)")
    print(f"{'variant':<22}{'train':>9}{'x ref':>7}{'eval':>9}{'x ref':>7}")
    base_train = statistics.median(train[variants[0]])
    base_eval = statistics.median(infer[variants[0]]) if not args.no_eval else float("nan")
    for name in variants:
        t = statistics.median(train[name])
        e = statistics.median(infer[name]) if not args.no_eval else float("nan")
        print(f"{name:<22}{t:9.1f}{t / base_train:7.2f}{e:9.1f}{e / base_eval:7.2f}")


if __name__ == "__main__":
    main()
