"""The built-in offline world: procedural 32x32 shape images with captions, in several visual domains.

Images are a pure function of (seed, split, domain, class, index): each one gets its own
``numpy.random.Generator``, so a class's images do not depend on which other classes are rendered, the
same arguments always give bit-identical tensors, and different split names give unrelated streams.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from clmerge.data.world_render import BACKGROUNDS, COLOURS, SHAPES, SIZE, Scene, render

CLASSNAMES: tuple[str, ...] = tuple(SHAPES)
DOMAINS: tuple[str, ...] = ("plain", "outline", "noise", "texture", "invert", "blur", "pixel", "dots", "fog",
                            "swirl")

# Caption prefixes per domain; the first one of each list is also the domain's prompt template prefix.
PREFIXES: dict[str, tuple[str, ...]] = {
    "plain": ("a photo of", "an image of", "a picture of", "a rendering of"),
    "outline": ("an outline drawing of", "a line drawing of"),
    "noise": ("a noisy photo of", "a grainy image of"),
    "texture": ("a textured photo of", "a patterned image of"),
    "invert": ("an inverted photo of", "a negative image of"),
    "blur": ("a blurry photo of", "a blurred image of"),
    "pixel": ("a pixelated photo of", "a low resolution image of"),
    "dots": ("a dotted photo of", "a stippled image of"),
    "fog": ("a foggy photo of", "a faded image of"),
    "swirl": ("a wavy photo of", "a distorted image of"),
}

TEMPLATES: dict[str, list[str]] = {
    "world": ["a photo of a {c}.", "an image of a {c}.", "a picture of a {c}.", "a rendering of a {c}.",
              "a {c}."],
    **{f"world_{d}": [f"{p} a {{c}}." for p in PREFIXES[d]] + ["a {c}."] for d in DOMAINS if d != "plain"},
}

# open_clip's OpenAI normalisation constants (open_clip.OPENAI_DATASET_MEAN / _STD).
NORMALIZE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
NORMALIZE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 3, H, W] -> float32, scaled to [0, 1] and normalised with the OpenAI mean/std."""
    mean = torch.tensor(NORMALIZE_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(NORMALIZE_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.to(torch.float32) / 255.0 - mean) / std


def _code(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown world domain {domain!r}; choose one of {', '.join(DOMAINS)}")


def render_split(classes: Sequence[int], domain: str, per_class: int, seed: int,
                 split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` images of each class in ``domain``: uint8 [N, 3, 32, 32] and int64 global labels [N].

    Images are ordered class by class, in the order of ``classes``.
    """
    _check_domain(domain)
    n = len(classes) * per_class
    images = np.empty((n, 3, SIZE, SIZE), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    base = [seed, _code(split), _code(domain)]
    for k, (c, i) in enumerate((c, i) for c in classes for i in range(per_class)):
        if not 0 <= c < len(CLASSNAMES):
            raise ValueError(f"class index {c} out of range 0..{len(CLASSNAMES) - 1}")
        rng = np.random.default_rng(base + [int(c), i])
        images[k], _ = render(rng, CLASSNAMES[c], domain)
        labels[k] = c
    return torch.from_numpy(images), torch.from_numpy(labels)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, domain: str, rng: np.random.Generator) -> str:
    """A caption naming the shape, with size, colour, background and position each dropped at random."""
    prefixes = PREFIXES[domain]
    words = [w for w, keep in ((scene.size, rng.random() < 0.3), (scene.colour, rng.random() < 0.35)) if keep]
    words.append(scene.shape)
    text = f"{prefixes[rng.integers(len(prefixes))]} {_article(words[0])} {' '.join(words)}"
    if rng.random() < 0.25:
        text += f" on {_article(scene.background)} {scene.background} background"
    if rng.random() < 0.15:
        text += " in the centre" if scene.position == "centre" else f" at the {scene.position}"
    return text + "."


def _pair_domains(mix: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    names = [d for d, w in mix.items() if w > 0]
    for d in names:
        _check_domain(d)
    weights = np.asarray([mix[d] for d in names], dtype=np.float64)
    if not names:
        raise ValueError("the pretraining domain mix has no positive weight")
    return names, np.cumsum(weights) / weights.sum()


def render_pairs_range(start: int, stop: int, seed: int,
                       mix: Mapping[str, float]) -> tuple[np.ndarray, list[str]]:
    """Pairs ``start..stop-1`` of the stream that :func:`render_pairs` draws (for parallel generation)."""
    names, cdf = _pair_domains(mix)
    images = np.empty((stop - start, 3, SIZE, SIZE), dtype=np.uint8)
    captions = []
    for k in range(start, stop):
        rng = np.random.default_rng([seed, _code("pairs"), k])
        domain = names[min(int(np.searchsorted(cdf, rng.random(), side="right")), len(names) - 1)]
        images[k - start], scene = render(rng, CLASSNAMES[rng.integers(len(CLASSNAMES))], domain)
        captions.append(caption(scene, domain, rng))
    return images, captions


def render_pairs(num: int, seed: int, mix: Mapping[str, float]) -> tuple[torch.Tensor, list[str]]:
    """``num`` image-caption pairs for contrastive pretraining; each pair's domain is drawn from ``mix``."""
    images, captions = render_pairs_range(0, num, seed, mix)
    return torch.from_numpy(images), captions


__all__ = ["CLASSNAMES", "DOMAINS", "TEMPLATES", "NORMALIZE_MEAN", "NORMALIZE_STD", "to_model_input",
           "render_split", "render_pairs", "render_pairs_range", "caption", "BACKGROUNDS", "COLOURS"]
