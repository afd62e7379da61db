"""The run config's schema: one frozen dataclass per TOML table, every field documented.

Each field's one-line doc (``metadata["doc"]``) is what ``sdlora config-help`` prints and what
``configs/lora.toml`` explains; a test keeps the two in step. Each table owns the checks that
involve only its own keys (its ``problems(where)`` method, run by ``typedtables.build_table``);
rules that span tables are in ``trainer/config/load.py`` ``cross_checks``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import schedulers
from schedulers import Schedule
from trainer import optimizers
from trainer.config.sd3 import T5_MAX_TOKENS, FlowMatchingConfig
from trainer.optimizers import OptimizerSpec
from typedtables import doc

# Bounds beyond which a value is a typo, not a plan (10**12 updates would be an ETA of
# millions of hours); every real SD run sits far inside them.
MAX_UPDATES = 10_000_000
MAX_PORT = 65_535  # the highest TCP port
MAX_RESOLUTION = 4096


@dataclass(frozen=True)
class ModelConfig:
    """[model]: the base Stable Diffusion checkpoint."""

    pretrained: str = doc(
        "Diffusers folder, hub id, or a single-file .safetensors checkpoint (required)", ""
    )
    revision: str = doc("Hub revision (branch, tag or commit) when `pretrained` is a hub id", "")
    variant: str = doc("Weight variant to load, e.g. 'fp16'; empty loads the default files", "")
    single_file_config: str = doc(
        "For a .safetensors checkpoint: diffusers folder or hub id whose component configs "
        "describe it (needed offline); empty lets diffusers infer it",
        "",
    )
    prediction_type: Literal["", "epsilon", "v_prediction"] = doc(
        "Override the noise scheduler's prediction type; empty reads it from the model", ""
    )
    arch: Literal["auto", "sd1", "sd2", "sdxl", "sd3"] = doc(
        "Model family: 'auto' reads it from model_index.json or the checkpoint's keys; an "
        "explicit value must agree with the model ('sd3': SD 3 and 3.5, see docs/sd3.md)",
        "auto",
    )
    t5: bool = doc(
        "SD3: load the T5-XXL text encoder; false trains and samples without it (zeros in "
        "its place, as SD3 allows), saving its memory",
        True,
    )
    t5_max_length: int = doc(
        "SD3: T5 tokens per caption (StableDiffusion3Pipeline's max_sequence_length, default "
        "256 there too; at most 512)",
        256,
    )
    vae: str = doc(
        "A VAE to use instead of the model's own: a diffusers folder or hub id (e.g. "
        "madebyollin/sdxl-vae-fp16-fix, which runs in fp16); empty = the model's",
        "",
    )

    def problems(self, where: str) -> list[str]:
        """Checks of this table alone."""
        p = []
        if not self.pretrained.strip():
            p.append(
                f"{where}.pretrained: required; a diffusers folder, hub id or .safetensors file"
            )
        if not 1 <= self.t5_max_length <= T5_MAX_TOKENS:
            p.append(f"{where}.t5_max_length: {self.t5_max_length} must be in [1, {T5_MAX_TOKENS}]")
        return p


# The adapter types, and which of [lora]'s type-specific keys each one reads (docs/adapters.md).
ADAPTER_TYPES = ("lora", "dora", "loha", "lokr")
TYPE_KEYS = {
    "dropout": ("lora", "dora"),
    "dora_axis": ("dora",),
    "rank_dropout": ("loha", "lokr"),
    "module_dropout": ("loha", "lokr"),
    "conv_tucker": ("loha", "lokr"),
    "factor": ("lokr",),
    "decompose_both": ("lokr",),
}


@dataclass(frozen=True)
class LoraConfig:
    """[lora]: the adapters that are trained."""

    type: Literal["lora", "dora", "loha", "lokr"] = doc(
        "Adapter type: 'lora' (low rank B·A), 'dora' (LoRA plus a trained magnitude per "
        "weight column), 'loha' (Hadamard product of two low-rank pairs), 'lokr' (Kronecker "
        "product); see docs/adapters.md",
        "lora",
    )
    rank: int = doc("Rank (r) of the UNet adapters (LoKr: of its decomposed factors)", 4)
    alpha: float = doc("Alpha; the update is scaled by alpha / rank", 4.0)
    dropout: float = doc("lora/dora: dropout on the adapter branch's input, in [0, 1)", 0.0)
    target_modules: tuple[str, ...] = doc(
        "UNet module names that get adapters", ["to_q", "to_k", "to_v", "to_out.0"]
    )
    train_text_encoder: bool = doc(
        "Also train adapters on the CLIP text encoder (SDXL: the first, CLIP ViT-L)", False
    )
    train_text_encoder_2: bool = doc(
        "SDXL and SD3: also train adapters on the second text encoder (OpenCLIP ViT-bigG)",
        False,
    )
    text_encoder_target_modules: tuple[str, ...] = doc(
        "Text-encoder module names that get adapters (in each trained text encoder)",
        ["q_proj", "k_proj", "v_proj", "out_proj"],
    )
    dora_axis: Literal["input", "output"] = doc(
        "dora: the weight norm DoRA divides by, 'input' (one magnitude per input column: the "
        "DoRA paper and LyCORIS, what A1111/Forge and ComfyUI apply) or 'output' (one per "
        "output row: peft's own DoRA, which only diffusers loads; needs output.format = "
        "'diffusers')",
        "input",
    )
    rank_dropout: float = doc(
        "loha/lokr: drop this share of the weight delta's output rows at each step, in [0, 1)",
        0.0,
    )
    module_dropout: float = doc(
        "loha/lokr: skip a module's adapter at a step with this probability, in [0, 1)", 0.0
    )
    conv_tucker: bool = doc(
        "loha/lokr: decompose the kernel of adapted k×k convolutions too (LyCORIS "
        "use_tucker: the hada_t* / lokr_t2 tensors); no effect on linear layers",
        False,
    )
    factor: int = doc(
        "lokr: split each dimension as factor × (dim / factor) for the Kronecker product; "
        "-1 picks the most balanced split",
        -1,
    )
    decompose_both: bool = doc(
        "lokr: also write the small Kronecker factor as a low-rank pair (lokr_w1_a/_b) when "
        "the rank is small enough for it",
        False,
    )
    save_dtype: Literal["", "fp16", "bf16", "fp32"] = doc(
        "Deprecated: use output.save_dtype (still read for one release; when set, it wins)", ""
    )

    def problems(self, where: str) -> list[str]:
        """Checks of this table alone."""
        p = []
        if self.rank < 1:
            p.append(f"{where}.rank: {self.rank} must be >= 1")
        if self.alpha <= 0:
            p.append(f"{where}.alpha: {self.alpha} must be > 0")
        for key in ("dropout", "rank_dropout", "module_dropout"):
            if not 0 <= getattr(self, key) < 1:
                p.append(f"{where}.{key}: {getattr(self, key)} must be in [0, 1)")
        if self.factor != -1 and self.factor < 1:
            p.append(f"{where}.factor: {self.factor} must be >= 1, or -1 (balanced split)")
        for key in ("target_modules", "text_encoder_target_modules"):
            names = getattr(self, key)
            if not names or any(not n.strip() for n in names):
                p.append(f"{where}.{key}: name at least one module and no empty names, e.g. 'to_q'")
        return p + self.type_key_problems(where)

    def type_key_problems(self, where: str) -> list[str]:
        """A type-specific key set (away from its default) for a type that does not read it.

        The value is what is compared, not whether the key was written: a resolved config
        (a checkpoint's ``config.toml``) holds every key at its default.
        """
        p = []
        defaults = LoraConfig.__dataclass_fields__
        for key, types in TYPE_KEYS.items():
            if self.type in types or getattr(self, key) == defaults[key].default:
                continue
            users = " or ".join(repr(t) for t in types)
            p.append(
                f"{where}.{key}: applies only to {where}.type = {users}, not "
                f"{self.type!r}; remove it (or set {where}.type)"
            )
        return p


@dataclass(frozen=True)
class DataConfig:
    """[data]: the images and captions."""

    path: str = doc("Dataset folder (required)", "")
    layout: Literal["auto", "kohya", "imagefolder"] = doc(
        "'kohya' = captions in .txt files beside images; 'imagefolder' = metadata.jsonl/.csv; "
        "'auto' picks imagefolder when a metadata file exists",
        "auto",
    )
    caption_extension: str = doc("Caption file extension for the kohya layout", ".txt")
    resolution: int = doc("Training side length in pixels (a multiple of 8)", 512)
    center_crop: bool = doc(
        "Center crop after resizing; false crops at a seeded random place", True
    )
    random_flip: bool = doc("Flip half of the images horizontally (seeded)", False)
    caption_dropout: float = doc("Probability of training an image with an empty caption", 0.0)
    shuffle_tags: bool = doc("Shuffle comma-separated tags in each caption (seeded)", False)
    keep_tokens: int = doc("With shuffle_tags: leading tags that stay in place", 0)
    buckets: bool = doc("Aspect-ratio buckets instead of square crops", False)
    bucket_step: int = doc("Bucket sides are multiples of this (a multiple of 8)", 64)
    bucket_min_side: int = doc("Smallest bucket side; 0 = resolution / 2", 0)
    bucket_max_side: int = doc("Largest bucket side; 0 = resolution × 2", 0)
    max_upscale: float = doc(
        "Largest upscaling an image may get to fill its bucket; smaller images are bad input",
        1.0,
    )
    bucket_max_crop: float = doc(
        "Largest share of a picture a bucket may cut away when a closer-shaped bucket is "
        "smaller (see docs/buckets.md)",
        0.05,
    )
    on_bad_image: Literal["error", "skip"] = doc(
        "Unusable image or caption: 'error' stops listing them all; 'skip' trains without "
        "them and writes output_dir/skipped_images.txt",
        "error",
    )
    cache_latents: Literal["auto", "memory", "disk", "off"] = doc(
        "Cache VAE posteriors: 'auto' = memory where valid (center crop), else off",
        "auto",
    )
    cache_text: Literal["auto", "on", "off"] = doc(
        "Cache text-encoder outputs: 'auto' = on where valid (frozen encoder, no tag shuffling)",
        "auto",
    )
    cache_dir: str = doc("Folder of the disk latent cache; empty = output_dir/cache", "")
    num_workers: int = doc("DataLoader worker processes; 0 loads in the main process", 0)
    persistent_workers: bool = doc("Keep DataLoader workers alive between epochs", True)

    def problems(self, where: str) -> list[str]:
        """Checks of this table alone."""
        p = []
        if not self.path.strip():
            p.append(f"{where}.path: required; the folder holding your images and captions")
        if self.resolution < 8 or self.resolution % 8:
            p.append(f"{where}.resolution: {self.resolution} must be a positive multiple of 8")
        elif self.resolution > MAX_RESOLUTION:
            p.append(
                f"{where}.resolution: {self.resolution} px is beyond any SD model "
                f"(at most {MAX_RESOLUTION}); SD 1.x trains at 512, SDXL at 1024"
            )
        if not 0 <= self.caption_dropout <= 1:
            p.append(f"{where}.caption_dropout: {self.caption_dropout} must be in [0, 1]")
        if self.num_workers < 0:
            p.append(f"{where}.num_workers: must be >= 0")
        if self.bucket_step < 8 or self.bucket_step % 8:
            p.append(f"{where}.bucket_step: {self.bucket_step} must be a positive multiple of 8")
        if not 0 <= self.bucket_max_crop < 1:
            p.append(f"{where}.bucket_max_crop: {self.bucket_max_crop} must be in [0, 1)")
        if self.max_upscale < 1:
            p.append(f"{where}.max_upscale: {self.max_upscale} must be >= 1 (1 = never upscale)")
        if self.keep_tokens < 0:
            p.append(f"{where}.keep_tokens: must be >= 0")
        if not self.caption_extension.startswith("."):
            p.append(
                f"{where}.caption_extension: {self.caption_extension!r} must start with a dot, "
                "e.g. '.txt'"
            )
        if self.cache_latents in ("memory", "disk") and not self.center_crop:
            p.append(
                f"{where}.cache_latents: {self.cache_latents!r} with {where}.center_crop = false "
                "would train every epoch on the first random crop; use 'auto' or 'off'"
            )
        return p


@dataclass(frozen=True)
class TrainConfig:
    """[train]: optimisation settings. Step counts are optimizer updates.

    The optimizer and its hyperparameters are the [optimizer] table; the base LRs stay here,
    because the LR schedule (and ``lr-plot``) scales them whatever the optimizer.
    """

    seed: int = doc("Seed for data order, noise, timesteps and dropout", 0)
    batch_size: int = doc("Images per micro-batch on each process", 1)
    gradient_accumulation_steps: int = doc("Micro-batches summed into one optimizer update", 1)
    max_steps: int = doc("Optimizer updates to run; 0 derives it from `epochs`", 0)
    epochs: int = doc("Passes over the dataset when `max_steps` is 0", 1)
    learning_rate: float = doc("Base LR of the UNet adapters", 1e-4)
    text_encoder_lr: float = doc("Base LR of the text-encoder adapters; 0 uses learning_rate", 0.0)
    text_encoder_2_lr: float = doc(
        "SDXL/SD3: base LR of the second text encoder's adapters; 0 uses text_encoder_lr (or "
        "learning_rate)",
        0.0,
    )
    max_grad_norm: float = doc("Clip the global gradient norm to this; 0 disables clipping", 1.0)
    mixed_precision: Literal["no", "fp16", "bf16"] = doc(
        "Autocast precision; fp16 needs CUDA, bf16 also runs on CPU", "no"
    )
    compile: bool = doc(
        "torch.compile the UNet (the first updates are slow while it compiles)", False
    )
    gradient_checkpointing: bool = doc("Recompute UNet activations to save memory", False)
    tf32: bool = doc(
        "Allow TF32 matmuls and convolutions on CUDA (Ampere and newer): much faster fp32 "
        "math at about fp16's precision in the mantissa; no effect on CPU",
        True,
    )
    channels_last: bool = doc(
        "Keep the UNet (and the VAE when latents are not cached) in channels_last memory "
        "format, which some GPUs run faster; see BENCHMARKS.md",
        False,
    )
    xformers: bool = doc(
        "Use xformers attention when importable on CUDA, else PyTorch SDPA (logged)", False
    )
    noise_offset: float = doc("Noise offset (adds per-channel constant noise); 0 disables", 0.0)
    snr_gamma: float = doc("Min-SNR-γ loss weighting (5.0 is the paper's); 0 disables", 0.0)

    def problems(self, where: str) -> list[str]:
        """Checks of this table alone."""
        p = []
        for key in ("batch_size", "gradient_accumulation_steps"):
            if getattr(self, key) < 1:
                p.append(f"{where}.{key}: {getattr(self, key)} must be >= 1")
        if self.max_steps < 0:
            p.append(f"{where}.max_steps: {self.max_steps} must be >= 0 (0 uses {where}.epochs)")
        elif self.max_steps > MAX_UPDATES:
            p.append(
                f"{where}.max_steps: {self.max_steps:,} updates is beyond any real run (at most "
                f"{MAX_UPDATES:,}); a LoRA typically needs 1,000 to 10,000"
            )
        if self.max_steps == 0 and self.epochs < 1:
            p.append(f"{where}.epochs: must be >= 1 when {where}.max_steps is 0")
        if self.learning_rate <= 0:
            p.append(f"{where}.learning_rate: {self.learning_rate} must be > 0")
        for key in (
            "text_encoder_lr",
            "text_encoder_2_lr",
            "max_grad_norm",
            "noise_offset",
            "snr_gamma",
        ):
            if getattr(self, key) < 0:
                p.append(f"{where}.{key}: {getattr(self, key)} must be >= 0")
        return p


@dataclass(frozen=True)
class ValidationConfig:
    """[validation]: a held-out set scored with a fixed-seed loss, and fixed-seed samples."""

    fraction: float = doc("Hold out this fraction of the distinct images (seeded); 0 = none", 0.0)
    path: str = doc("A separate validation folder (same layouts as data.path); empty = none", "")
    every_n_steps: int = doc(
        "Score every N updates (and always at the end); 0 = only at the end", 0
    )
    seed: int = doc(
        "Seed of the held-out split and of the validation noise, apart from train.seed, so "
        "runs trained with different seeds are scored on the same images and noise",
        0,
    )
    timesteps: int = doc(
        "Fixed, evenly spaced timesteps each example is scored at (SD3: positions of the "
        "model's σ table)",
        4,
    )
    batch_size: int = doc("Examples per validation forward pass", 4)
    prompts: tuple[str, ...] = doc(
        "Prompts sampled at every validation point into output_dir/samples/; empty = none", []
    )
    negative_prompt: str = doc("Negative prompt of every sample; empty = none", "")
    sample_steps: int = doc(
        "Denoising steps per sample (DDIM; SD3: the model's flow-matching Euler sampler)", 25
    )
    guidance_scale: float = doc("Classifier-free guidance scale of the samples", 7.5)
    sample_seed: int = doc("Seed of every sample, the same at every step and in every run", 0)
    scores: tuple[Literal["clip_t", "clip_i", "dino"], ...] = doc(
        "Image scores of the samples at every validation point: 'clip_t' (samples against "
        "their prompts, CLIP), 'clip_i' and 'dino' (samples against the held-out images, CLIP "
        "and DINO); [] = none",
        [],
    )
    clip_model: str = doc(
        "The CLIP model of clip_t and clip_i: a hub id or a local transformers folder",
        "openai/clip-vit-large-patch14",
    )
    dino_model: str = doc(
        "The DINO model of dino: a hub id or a local transformers folder",
        "facebook/dinov2-small",
    )

    def problems(self, where: str) -> list[str]:
        """Checks of this table alone."""
        p = self._score_problems(where)
        if not 0 <= self.fraction < 1:
            p.append(f"{where}.fraction: {self.fraction} must be in [0, 1)")
        if self.fraction and self.path:
            p.append(f"{where}.fraction / {where}.path: set one, not both")
        if self.sample_steps < 1 or self.guidance_scale < 0:
            p.append(f"{where}.sample_steps must be >= 1 and guidance_scale >= 0")
        if self.every_n_steps < 0 or self.timesteps < 1 or self.batch_size < 1:
            p.append(f"{where}.every_n_steps must be >= 0; timesteps and batch_size >= 1")
        for i, prompt in enumerate(self.prompts):
            if not prompt.strip():
                p.append(
                    f"{where}.prompts[{i}]: empty prompt; write one, or remove it from the list"
                )
        return p

    def _score_problems(self, where: str) -> list[str]:
        p = []
        if len(set(self.scores)) != len(self.scores):
            p.append(f"{where}.scores: {list(self.scores)} names a score twice")
        if self.scores and not self.prompts:
            p.append(
                f"{where}.scores: the scores are computed on the samples; set "
                f"{where}.prompts (or scores = [])"
            )
        against_images = [s for s in self.scores if s != "clip_t"]
        if against_images and not (self.fraction or self.path):
            p.append(
                f"{where}.scores: {', '.join(against_images)} compare the samples with the "
                f"held-out images; set {where}.fraction or {where}.path (or drop them)"
            )
        for key, needed in (("clip_model", ("clip_t", "clip_i")), ("dino_model", ("dino",))):
            if not getattr(self, key).strip() and any(s in needed for s in self.scores):
                p.append(f"{where}.{key}: empty, but {where}.scores needs it")
        return p


@dataclass(frozen=True)
class CheckpointConfig:
    """[checkpoint]: when to save, how many to keep, and resuming."""

    every_n_steps: int = doc(
        "Save every N optimizer updates (also always at the end and on SIGTERM/SIGINT); 0 = "
        "only those",
        0,
    )
    keep_last: int = doc("Keep the newest N checkpoints; 0 keeps all", 0)
    resume: str = doc(
        "'' starts fresh; 'latest' resumes the newest checkpoint in output_dir (or starts "
        "fresh if there is none); or a path to a checkpoints/step-NNNNNN folder",
        "",
    )
    allow_change: tuple[str, ...] = doc(
        "Config keys (train.max_steps), bare names (max_steps) or tables (lr_scheduler) that "
        "may differ from the checkpoint's config on resume",
        [],
    )

    def problems(self, where: str) -> list[str]:
        """Checks of this table alone."""
        if self.every_n_steps < 0 or self.keep_last < 0:
            return [f"{where}.every_n_steps / {where}.keep_last: must be >= 0"]
        return []


@dataclass(frozen=True)
class OutputConfig:
    """[output]: the final LoRA files, and what `sdlora export` writes by default."""

    format: Literal["diffusers", "kohya", "both"] = doc(
        "'diffusers' = pytorch_lora_weights.safetensors (load_lora_weights); 'kohya' = "
        "<name>.safetensors for A1111/Forge, ComfyUI, SD.Next; 'both'",
        "both",
    )
    save_dtype: Literal["fp16", "bf16", "fp32"] = doc(
        "dtype of the final weights (checkpoints always keep fp32)", "fp16"
    )
    name: str = doc(
        "LoRA name: the kohya file is <name>.safetensors, and A1111 lists it under this name "
        "(ss_output_name, modelspec.title); empty = the output_dir folder's name",
        "",
    )


@dataclass(frozen=True)
class LoggingConfig:
    """[logging]: where progress goes."""

    tracker: Literal["tensorboard", "wandb", "none"] = doc(
        "Experiment tracker (metrics.jsonl is always written)", "tensorboard"
    )
    project: str = doc("Tracker project / run-group name", "sdlora")
    prometheus_port: int = doc(
        "Serve /metrics for Prometheus on this TCP port (all interfaces) from the run's main "
        "process while it trains: update, LRs, loss, throughput, memory; 0: off. A sweep's "
        "trials take the first free port from it on (docs/progress.md)",
        0,
    )

    def problems(self, where: str) -> list[str]:
        """Ranges, and the extras: a missing package is found with the config, not after the
        models load."""
        p = []
        if not 0 <= self.prometheus_port <= MAX_PORT:
            p.append(
                f"{where}.prometheus_port: {self.prometheus_port} is not a TCP port; use "
                f"1..{MAX_PORT}, or 0 for no metrics server"
            )
        return p + self.package_problems(where)

    def package_problems(self, where: str) -> list[str]:
        """The packages the settings need that this environment lacks, each with its extra
        (``sdlora serve`` leaves these out: they say nothing about a schedule)."""
        p = []
        if self.tracker == "wandb" and importlib.util.find_spec("wandb") is None:
            p.append(
                f'{where}.tracker: "wandb" needs the wandb package, which is not installed; '
                "install it with: pip install 'sdlora[wandb]' (or use \"tensorboard\")"
            )
        if self.prometheus_port and importlib.util.find_spec("prometheus_client") is None:
            p.append(
                f"{where}.prometheus_port: serving metrics needs the prometheus_client package, "
                "which is not installed; install it with: pip install 'sdlora[prometheus]' (or "
                "set it to 0)"
            )
        return p


@dataclass(frozen=True)
class RunConfig:
    """A whole run. Top-level keys come before the first table in the TOML file."""

    output_dir: str = doc("Where weights, checkpoints, metrics and logs are written", "output")
    model: ModelConfig = doc("[model] table", ModelConfig())
    lora: LoraConfig = doc("[lora] table", LoraConfig())
    data: DataConfig = doc("[data] table", DataConfig())
    train: TrainConfig = doc("[train] table", TrainConfig())
    optimizer: OptimizerSpec = doc(
        "[optimizer] table: `name` plus that optimizer's fields", optimizers.get("adamw")()
    )
    lr_scheduler: Schedule = doc(
        "[lr_scheduler] table: `name` plus that schedule's fields", schedulers.get("constant")()
    )
    validation: ValidationConfig = doc("[validation] table", ValidationConfig())
    checkpoint: CheckpointConfig = doc("[checkpoint] table", CheckpointConfig())
    output: OutputConfig = doc("[output] table", OutputConfig())
    logging: LoggingConfig = doc("[logging] table", LoggingConfig())
    flow_matching: FlowMatchingConfig = doc(
        "[flow_matching] table: SD3's objective (docs/sd3.md)", FlowMatchingConfig()
    )

    def base_lrs(self) -> list[float]:
        """One base LR per optimizer param group, in order: the UNet, then each trained text
        encoder (SDXL: the first, then the second)."""
        train = self.train
        lrs = [train.learning_rate]
        if self.lora.train_text_encoder:
            lrs.append(train.text_encoder_lr or train.learning_rate)
        if self.lora.train_text_encoder_2:
            # One text-encoder LR for both unless the second is given its own (as kohya's
            # single --text_encoder_lr value applies to both).
            lrs.append(train.text_encoder_2_lr or train.text_encoder_lr or train.learning_rate)
        return lrs

    def to_dict(self) -> dict[str, Any]:
        """The config as plain TOML/JSON data: tables as dicts, tuples as lists."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (Schedule, OptimizerSpec)):
                value = {"name": value.name, **value.params()}
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = dataclasses.asdict(value)
            out[f.name] = _plain(value)
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def tables_hash(config: RunConfig, tables: Sequence[str]) -> str:
    """A stable hash of the named top-level tables, to detect changes between runs."""
    data = config.to_dict()
    blob = json.dumps({t: data[t] for t in tables}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
