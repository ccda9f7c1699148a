"""`clmerge pretrain`: contrastive pretraining of the built-in tiny CLIP (world-tiny) on world captions.

Recipe: symmetric CLIP loss (open_clip ``ClipLoss``) on ``render_pairs`` image-caption pairs, AdamW (no weight
decay on gains, biases, embeddings' norms and ``logit_scale``), linear warmup then cosine to zero, fp32. The
weights are written as a safetensors state dict (fp16 by default), atomically.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import save as safetensors_bytes

from clmerge.config import PretrainConfig
from clmerge.data.world import render_pairs_range, to_model_input
from clmerge.models.loading import register_builtin_configs
from clmerge.training.schedule import lr_at

_CHUNK = 4096


def generate_pairs(cfg: PretrainConfig) -> tuple[torch.Tensor, list[str]]:
    """All ``cfg.num_pairs`` pairs, rendered in chunks by ``cfg.workers`` processes (same result for any count)."""
    bounds = [(a, min(a + _CHUNK, cfg.num_pairs)) for a in range(0, cfg.num_pairs, _CHUNK)]
    args = [(a, b, cfg.seed, dict(cfg.mix)) for a, b in bounds]
    if cfg.workers > 1 and len(bounds) > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            parts = list(pool.map(_render_chunk, args))
    else:
        parts = [_render_chunk(a) for a in args]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    return images, [c for p in parts for c in p[1]]


def _render_chunk(args: tuple[int, int, int, dict[str, float]]) -> tuple[np.ndarray, list[str]]:
    return render_pairs_range(*args)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's convention: no decay on 1-d tensors (gains, biases), embeddings' scales or logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_state_dict(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype,
                    metadata: dict[str, str] | None = None) -> None:
    """Write floating tensors as ``dtype`` to a safetensors file: temp file, flush, fsync, then os.replace."""
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    data = safetensors_bytes(tensors, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _progress(console: Console | None) -> Progress:
    return Progress(TextColumn("[bold]pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[ips]:.0f} img/s"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def pretrain(cfg: PretrainConfig, console: Console | None = None) -> Path:
    """Pretrain ``cfg.model`` contrastively on world pairs and write its weights to ``cfg.output``."""
    console = console or Console()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    console.print(f"rendering {cfg.num_pairs:,} image-caption pairs ({cfg.workers} workers)")
    images, captions = generate_pairs(cfg)
    register_builtin_configs()
    tokens = open_clip.get_tokenizer(cfg.model)(captions)
    torch.manual_seed(cfg.seed)
    model = open_clip.create_model(cfg.model)
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    order = torch.Generator().manual_seed(cfg.seed)
    perm, pos, recent = torch.randperm(len(images), generator=order), 0, []
    console.print(f"data ready in {time.perf_counter() - start:.1f} s; training {cfg.steps} steps "
                  f"of batch {cfg.batch_size}")
    with _progress(console) as bar:
        task = bar.add_task("pretrain", total=cfg.steps, loss=math.nan, ips=0.0)
        t0 = time.perf_counter()
        for step in range(cfg.steps):
            if pos + cfg.batch_size > len(perm):
                perm, pos = torch.randperm(len(images), generator=order), 0
            idx = perm[pos:pos + cfg.batch_size]
            pos += cfg.batch_size
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps)
            img_f, txt_f, scale = model(to_model_input(images[idx]), tokens[idx])
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            recent = (recent + [loss.item()])[-50:]
            bar.update(task, advance=1, loss=sum(recent) / len(recent),
                       ips=(step + 1) * cfg.batch_size / (time.perf_counter() - t0))
    final_loss = sum(recent) / len(recent)
    out = Path(cfg.output)
    meta = {"model": cfg.model, "recipe": repr(cfg), "final_loss_last50": f"{final_loss:.4f}"}
    save_state_dict(model.state_dict(), out, getattr(torch, cfg.save_dtype), meta)
    console.print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); final loss (mean of last "
                  f"{len(recent)} steps) {final_loss:.4f}; logit scale {model.logit_scale.exp().item():.1f}; "
                  f"wall time {time.perf_counter() - start:.0f} s")
    return out
