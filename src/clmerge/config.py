"""Typed configuration: the dataclass schemas Hydra validates against, and the frozen run config.

The schemas are registered in Hydra's ConfigStore under ``schema/<group>`` (never in the option groups
themselves, so ``benchmark=glob(*)`` sweeps cannot pick them up). The library receives a ``RunConfig``
built once by :func:`to_run_config`; nothing below ``hydra_app.py`` ever sees a ``DictConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class ModelConfig:
    """Which open_clip model to start from."""

    name: str = "world-tiny"  # open_clip model name, or a built-in one ("world-tiny")
    pretrained: str = "builtin"  # "builtin" | open_clip tag | path to .safetensors/.pt | "local-dir:<dir>"
    force_quick_gelu: bool = False


@dataclass
class WorldDataConfig:
    """How many images the built-in world renders per class and split (ignored by real datasets)."""

    domain: str = "plain"  # the rendering domain of a class-incremental world benchmark
    train_per_class: int = 200
    val_per_class: int = 0
    test_per_class: int = 50


@dataclass
class BenchmarkConfig:
    """A task sequence: which data, which setting, which order."""

    name: str = MISSING
    setting: str = MISSING  # class_incremental | domain_incremental | multi_dataset
    dataset: str = MISSING  # "world" or a real dataset name (docs/benchmarks.md); "multi" for multi_dataset
    num_tasks: int = 5
    # class-incremental order: reference | seeded | natural (= null) | an explicit permutation [i, j, ...]
    class_order: Any = "reference"
    domains: list[str] = field(default_factory=list)  # domain-incremental: one domain per task, in order
    datasets: list[str] = field(default_factory=list)  # multi_dataset: one dataset per task, in order
    task_order: str = "listed"  # domains / datasets: listed (as above) | seeded (shuffled with the run seed)
    templates: str = MISSING  # key of the prompt-template set; "default" = each dataset's reference set
    epochs: Optional[int] = 10  # the reference's epochs per task; finetune=reference uses it
    dataset_epochs: dict[str, int] = field(default_factory=dict)  # multi_dataset: epochs per dataset
    skip_corrupt: bool = False  # drop unreadable images (with a warning) instead of failing on them
    # real datasets: share of each task's training images (per class, seeded) held out of fine-tuning as its
    # validation split, for merge.alpha=auto; 0 = none (the reference trains on every training image)
    val_fraction: float = 0.0
    # held-out control sets for zero-shot retention (ZR): world/<domain> or a prepared real dataset's name
    control: list[str] = field(default_factory=list)
    world: WorldDataConfig = field(default_factory=WorldDataConfig)


@dataclass
class PamConfig:
    """PAM's training-time alignment (SPEC.md 1.2, arXiv 2506.03189); used by finetune.regime=pam."""

    p: float = 0.5  # share of the global vector's entries (by magnitude) protected from sign conflicts
    every: int = 100  # K: optimizer steps between alignments
    align_at_end: bool = True  # also align after a task's last step
    scope: str = "tensor"  # top-p mask per tensor | global (one threshold over the whole vector)
    reset: str = "zero"  # conflicting entries reset to zero | global (the global vector's value)
    reset_moments: bool = False  # also zero AdamW's moments at reset entries
    merge: str = "pairwise_mean"  # global <- (global + task) / 2 | running_mean (uniform mean over tasks)


@dataclass
class LoraConfig:
    """Low-rank adapters on the visual tower (finetune.adapter=lora): W = W_0 + (alpha / r) B A."""

    r: int = 32
    alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: ["attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"])
    lr: float = 1e-4  # replaces finetune.lr for the adapters


@dataclass
class EwcConfig:
    """EWC (SPEC.md 3.5): L = CE + lamb * 1/2 * sum_p F[p] (theta[p] - theta*[p])^2, online Fisher."""

    lamb: float = 1e6  # lambda_ewc: the reference's value, calibrated for its buggy Fisher; sweep it
    alpha: float = 0.5  # online decay: F <- alpha * F + (1 - alpha) * F_t after each task
    fisher_labels: str = "argmax"  # argmax (the reference's pseudo-labels) | sampled (from softmax) | true
    fisher_transform: str = "eval"  # eval | train: the transform of the task's images the Fisher sees


@dataclass
class LwfConfig:
    """LwF (SPEC.md 3.6): L = CE + lamb * KD(old head, teacher = the model after the previous task)."""

    lamb: float = 0.3
    temperature: float = 2.0


@dataclass
class FinetuneConfig:
    """The per-task fine-tuning recipe (SPEC.md section 3)."""

    regime: str = "sequential"  # sequential | independent | joint | pam
    adapter: str = "full"  # full: the whole visual tower is trained | lora: low-rank adapters (finetune.lora)
    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    batch_size: int = 128
    epochs: Optional[int] = 10  # per task; null = the benchmark's (per-task) epochs; ignored when `steps` is set
    steps: Optional[int] = None  # optimizer steps per task (overrides epochs)
    warmup_steps: int = 500  # linear warmup length, restarted every task
    warmup_ratio: Optional[float] = None  # if set: warmup = ceil(ratio * steps of the task), overrides warmup_steps
    grad_clip: float = 1.0  # max total L2 norm of the gradient; <= 0 disables clipping
    precision: str = "fp32"  # auto (bf16 where native, fp16 on older GPUs, else fp32) | fp32 | bf16 | fp16
    accumulate: int = 1  # micro-batches per optimizer step (batch_size stays the global batch)
    optimizer_impl: str = "auto"  # AdamW kernels: auto (= fused) | fused | foreach | plain
    distributed: str = "auto"  # auto: data-parallel when launched by torchrun | on: require torchrun | off
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log: str = "none"  # none | csv: every optimizer step to <run dir>/training_log.csv
    pam: PamConfig = field(default_factory=PamConfig)  # used by regime=pam only
    lora: LoraConfig = field(default_factory=LoraConfig)  # used by adapter=lora only
    regularizer: str = "none"  # none | ewc | lwf: an extra loss term (sequential regime)
    ewc: EwcConfig = field(default_factory=EwcConfig)
    lwf: LwfConfig = field(default_factory=LwfConfig)
    checkpoint_every: int = 0  # save a step checkpoint (mid-task resume) every N optimizer steps; 0 = off


@dataclass
class TiesConfig:
    """TIES trimming (SPEC.md 2.2); the defaults reproduce the reference (top 20 % of the full model)."""

    k: float = 0.2  # keep floor(k * N_ref) entries (plus ties) per task vector
    scope: str = "global"  # global: one threshold over the whole vector | tensor: one per tensor
    # N_ref, global scope: full_model (every floating entry; LoRA factor merges use stored) | stored
    k_denominator: str = "full_model"


@dataclass
class DareConfig:
    """DARE random drop (Yu et al. 2024)."""

    p: float = 0.5  # drop probability; kept entries are rescaled by 1 / (1 - p)


@dataclass
class MergeConfig:
    """One merge method, its coefficient and the knobs of its parts."""

    method: str = "magmax"
    alpha: Any = None  # lambda: a number, null = the method's documented default, or auto (grid on validation data)
    alpha_grid: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
                                                             1.25, 1.5])  # lambdas tried by alpha=auto
    ties: TiesConfig = field(default_factory=TiesConfig)
    dare: DareConfig = field(default_factory=DareConfig)
    # LoRA runs: merge the dense deltas (alpha/r) B A (product) or the factors A, B (factors); auto = factors
    # for regime=pam (PAM averages factors while training), product otherwise
    granularity: str = "auto"
    save_steps: bool = False  # `clmerge merge` also stores m_t of every step (eval folds them on the fly anyway)
    export: Optional[str] = None  # write the final merged model as a full open_clip checkpoint (.safetensors)


@dataclass
class EvalConfig:
    """What `clmerge eval` evaluates."""

    methods: list[str] = field(default_factory=lambda: ["magmax", "average"])
    batch_size: int = 256
    baselines: bool = True  # also evaluate zero-shot and the un-merged fine-tuned models
    num_workers: int = 0  # processes decoding the test images of real datasets (once per run)
    image_cache_dir: Optional[str] = None  # where decoded real test images are memory-mapped; null = run dir


@dataclass
class PathsConfig:
    """Where checkpoints, run outputs and real datasets live."""

    store: str = "clmerge-runs/store"
    output: str = "clmerge-runs/outputs"
    data: str = "data"


@dataclass
class Config:
    """The primary config shared by `finetune`, `merge`, `eval` and `run` (one store key for all)."""

    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = torch's default


@dataclass
class PretrainConfig:
    """`clmerge pretrain`: contrastive pretraining of the built-in tiny CLIP on world captions.

    The defaults are the recipe of the shipped weights (`clmerge/assets/world_clip.safetensors`).
    """

    output: str = "world_clip.safetensors"
    model: str = "world-tiny"
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 150
    num_pairs: int = 150_000
    mix: dict[str, float] = field(default_factory=lambda: {
        "plain": 0.46, "outline": 0.08, "noise": 0.08, "texture": 0.08, "pixel": 0.08, "fog": 0.06,
        "swirl": 0.06, "blur": 0.05, "invert": 0.05})  # share of pretraining pairs per world domain
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = torch's default
    workers: int = 2  # processes rendering the pairs
    save_dtype: str = "float16"  # storage dtype of the floating tensors in the weights file


SETTINGS = ("class_incremental", "domain_incremental", "multi_dataset")
REGIMES = ("sequential", "independent", "joint", "pam")
ADAPTERS = ("full", "lora")
REGULARIZERS = ("none", "ewc", "lwf")
REGULARIZED_REGIMES = ("sequential",)  # regimes whose tasks follow one another, so a regularizer applies
