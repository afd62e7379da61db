"""What a LoRA file's header says: our run record, kohya's ``ss_*``, SAI's ``modelspec.*``.

Three layers, each a plain function of its inputs so it can be tested on its own:

1. :func:`training_record` — the run as JSON (``sdlora_training`` in every file we write): the
   config values that shape the weights plus the facts only the loop knows (:class:`RunFacts`:
   image count, tag frequency, epochs, optimizer). ``sdlora export`` rebuilds the other keys
   from it, so a LoRA exported later carries the same metadata as one written at the end of
   the run.
2. :func:`kohya_metadata` — the ``ss_*`` keys A1111/Forge and kohya's tools read (names and
   string forms as kohya's ``train_network.py`` writes them: every value ``str()``-ed, so
   booleans are ``"True"``/``"False"``).
3. :func:`modelspec_metadata` — the SAI model spec keys (``modelspec.architecture`` such as
   ``stable-diffusion-v1/lora``, title, resolution, date, prediction type).

The hashes are ``trainer/lora/hashes.py``'s.

No absolute path ever goes into a header: the base model is stored as its last path part (a
hub id stays as it is), as kohya stores ``ss_sd_model_name``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.config import sd3 as sd3_config
from trainer.models.architectures import get as get_architecture

RECORD_FORMAT = 2
SAI_MODEL_SPEC_VERSION = "1.0.0"
# kohya's network module for plain LoRA (what A1111 and kohya's tools key their loaders on).
KOHYA_NETWORK_MODULE = "networks.lora"
# What kohya's scripts record for a LyCORIS network (DoRA, LoHa, LoKr): the module, and the
# LyCORIS algorithm among its network_args (``algo=loha``).
LYCORIS_NETWORK_MODULE = "lycoris.kohya"
LYCORIS_ALGO = {"dora": "lora", "loha": "loha", "lokr": "lokr"}


# ---------------------------------------------------------------- paths


def model_name(source: str) -> str:
    """A base model as it may be shared: a local file or folder → its last part; a hub id as is.

    kohya stores ``os.path.basename`` of a local model and the id of a hub model; so do we.
    """
    text = str(source).rstrip("/\\")
    if not text:
        return ""
    if os.path.isabs(text) or Path(text).exists():
        return Path(text).name
    return text


def strip_paths(value: Any) -> Any:
    """``value`` with every absolute path string (at any depth) reduced to its last part."""
    if isinstance(value, str):
        return Path(value.rstrip("/\\")).name if os.path.isabs(value) else value
    if isinstance(value, Mapping):
        return {k: strip_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strip_paths(v) for v in value]
    return value


# ---------------------------------------------------------------- facts from the run


@dataclass(frozen=True)
class RunFacts:
    """What only the training loop knows; everything else comes from the config.

    Attributes:
        steps: Optimizer updates done.
        epochs: Epochs begun (a run of 2.5 epochs counts 3, as kohya's ``ss_epoch``).
        image_count: Training examples per epoch, repeats included (kohya's
            ``ss_num_train_images``).
        tag_frequency: ``{folder: {tag: count}}`` over the distinct captions (kohya's
            ``ss_tag_frequency``; A1111 shows it as the LoRA's tags).
        dataset_dirs: ``{folder: {"n_repeats": n, "img_count": k}}`` (``ss_dataset_dirs``).
        optimizer: The optimizer, e.g. ``torch.optim.AdamW(betas=(0.9, 0.999),...)``.
        num_processes: Training processes (the global batch is batch × processes).
        prediction_type: The noise scheduler's, ``epsilon`` or ``v_prediction``
            (``flow_matching`` for SD3).
        started_at: Unix time the run started (None if unknown).
        model_variant: SD3's variant (``5-medium``, ``5-large``, ``medium``); empty otherwise.
    """

    steps: int
    epochs: int = 0
    image_count: int = 0
    tag_frequency: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    dataset_dirs: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    optimizer: str = ""
    num_processes: int = 1
    prediction_type: str = "epsilon"
    started_at: float | None = None
    model_variant: str = ""


def tag_frequency(examples: Iterable[tuple[str | Path, str]]) -> dict[str, dict[str, int]]:
    """Count comma-separated tags per image folder, once per distinct image.

    kohya's rule (``library/train_util.py``): split the caption at commas, strip, lower-case,
    skip empty tags; key by the folder's name (``10_cats``), never its full path.

    Args:
        examples: ``(image path, caption)`` pairs; repeats of an image are counted once.
    """
    seen: dict[Path, str] = {}
    for path, caption in examples:
        seen.setdefault(Path(path), caption)
    counts: dict[str, Counter] = {}
    for path, caption in seen.items():
        tags = (t.strip().lower() for t in caption.split(","))
        counts.setdefault(path.parent.name, Counter()).update(t for t in tags if t)
    return {folder: dict(sorted(c.items())) for folder, c in sorted(counts.items())}


def dataset_dirs(examples: Iterable[tuple[str | Path, str]]) -> dict[str, dict[str, int]]:
    """``{folder name: {"n_repeats", "img_count"}}`` from examples that list repeats again."""
    uses: Counter = Counter()
    for path, _ in examples:
        uses[Path(path)] += 1
    per_dir: dict[str, dict[str, int]] = {}
    for path, count in uses.items():
        entry = per_dir.setdefault(path.parent.name, {"n_repeats": count, "img_count": 0})
        entry["img_count"] += 1
        entry["n_repeats"] = max(entry["n_repeats"], count)
    return dict(sorted(per_dir.items()))


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """``torch.optim.AdamW(betas=(0.9, 0.999),eps=1e-08,weight_decay=0.01)``: class and its
    hyper-parameters other than the LR, in the form of kohya's ``ss_optimizer``."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds it
    kind = type(optimizer)
    module = kind.__module__
    if module.startswith("torch.optim."):
        module = "torch.optim"  # the public path, not the private submodule
    keys = ("betas", "eps", "weight_decay", "momentum", "nesterov")
    args = ",".join(f"{k}={optimizer.defaults[k]}" for k in keys if k in optimizer.defaults)
    return f"{module}.{kind.__name__}({args})"


def collect_run_facts(
    examples: Iterable[Any],
    steps: int,
    epochs: int,
    optimizer: torch.optim.Optimizer | str,
    num_processes: int = 1,
    prediction_type: str = "epsilon",
    started_at: float | None = None,
    model_variant: str = "",
) -> RunFacts:
    """The :class:`RunFacts` of a run, from its examples (objects with ``path`` and ``caption``).

    Args:
        examples: The training examples as the loader serves them (repeats listed again).
        steps: Optimizer updates done.
        epochs: Epochs begun.
        optimizer: The optimizer, or its description.
        num_processes: Training processes.
        prediction_type: The noise scheduler's prediction type.
        started_at: Unix time the run started.
        model_variant: SD3's variant.
    """
    pairs = [(e.path, e.caption) for e in examples]
    return RunFacts(
        steps=steps,
        epochs=epochs,
        image_count=len(pairs),
        tag_frequency=tag_frequency(pairs),
        dataset_dirs=dataset_dirs(pairs),
        optimizer=optimizer if isinstance(optimizer, str) else optimizer_name(optimizer),
        num_processes=num_processes,
        prediction_type=prediction_type,
        started_at=started_at,
        model_variant=model_variant,
    )


# ---------------------------------------------------------------- our record


def training_record(
    config: Any, architecture: str, facts: RunFacts, finished_at: float | None = None
) -> dict[str, Any]:
    """The run as JSON for the ``sdlora_training`` header entry (no absolute paths).

    Args:
        config: The run's ``RunConfig``.
        architecture: ``sd1``, ``sd2``, ``sdxl`` or ``sd3``.
        facts: What the loop knows about the run.
        finished_at: Unix time the weights were written (default: now).
    """
    lora, data, train = config.lora, config.data, config.train
    schedule = config.lr_scheduler
    record = {
        "format": RECORD_FORMAT,
        "base_model": model_name(config.model.pretrained),
        "architecture": architecture,
        "prediction_type": facts.prediction_type,
        "adapter_type": lora.type,
        "adapter_args": adapter_args(lora),
        "rank": lora.rank,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "target_modules": list(sd3_config.lora_targets(lora, architecture)),
        "text_encoder_trained": lora.train_text_encoder,
        "text_encoder_2_trained": lora.train_text_encoder_2,
        "text_encoder_target_modules": list(lora.text_encoder_target_modules)
        if lora.train_text_encoder or lora.train_text_encoder_2
        else [],
        "steps": facts.steps,
        "epochs": facts.epochs,
        "image_count": facts.image_count,
        "tag_frequency": facts.tag_frequency,
        "dataset_dirs": facts.dataset_dirs,
        "seed": train.seed,
        "resolution": data.resolution,
        "batch_size": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "num_processes": facts.num_processes,
        "mixed_precision": train.mixed_precision,
        "gradient_checkpointing": train.gradient_checkpointing,
        "learning_rate": train.learning_rate,
        "text_encoder_lr": (train.text_encoder_lr or train.learning_rate)
        if lora.train_text_encoder
        else None,
        "text_encoder_2_lr": (
            train.text_encoder_2_lr or train.text_encoder_lr or train.learning_rate
        )
        if lora.train_text_encoder_2
        else None,
        "lr_scheduler": {"name": schedule.name, **schedule.params()},
        "warmup_updates": schedule.warmup_updates(facts.steps),
        "base_lrs": config.base_lrs(),
        "optimizer": facts.optimizer,
        "max_grad_norm": train.max_grad_norm,
        "noise_offset": train.noise_offset,
        "snr_gamma": train.snr_gamma,
        "caption_dropout": data.caption_dropout,
        "random_flip": data.random_flip,
        "center_crop": data.center_crop,
        "shuffle_tags": data.shuffle_tags,
        "keep_tokens": data.keep_tokens,
        "buckets": data.buckets,
        "bucket_min_side": data.bucket_min_side or data.resolution // 2,
        "bucket_max_side": data.bucket_max_side or data.resolution * 2,
        "cache_latents": data.cache_latents,
        "started_at": facts.started_at,
        "finished_at": finished_at if finished_at is not None else _now(),
    }
    if architecture == sd3_config.FLOW:
        record["model_variant"] = facts.model_variant
        record["flow_matching"] = dataclasses.asdict(config.flow_matching)
        record["t5"] = config.model.t5
        record["t5_max_length"] = config.model.t5_max_length
    return strip_paths(record)


def adapter_args(lora: Any) -> dict[str, Any]:
    """The ``[lora]`` keys that only the chosen adapter type reads, with their values."""
    from trainer.config.schema import TYPE_KEYS

    return {k: getattr(lora, k) for k, types in TYPE_KEYS.items() if lora.type in types}


def network_args(adapter: str, args: Mapping[str, Any]) -> dict[str, str] | None:
    """kohya's ``ss_network_args`` of a LyCORIS network: LyCORIS' own argument names, every
    value a string (kohya parses them from ``key=value`` words); None for plain LoRA."""
    if adapter not in LYCORIS_ALGO:
        return None
    out = {"algo": LYCORIS_ALGO[adapter]}
    if adapter == "dora":
        out |= {"dora_wd": "True", "wd_on_output": str(args.get("dora_axis") == "output")}
    else:
        out |= {
            "rank_dropout": str(args.get("rank_dropout", 0.0)),
            "module_dropout": str(args.get("module_dropout", 0.0)),
            "use_tucker": str(args.get("conv_tucker", False)),
        }
    if adapter == "lokr":
        out |= {
            "factor": str(args.get("factor", -1)),
            "decompose_both": str(args.get("decompose_both", False)),
        }
    return out


def _now() -> float:
    return datetime.datetime.now(datetime.timezone.utc).timestamp()


# ---------------------------------------------------------------- kohya and SAI keys


def _kohya_str(value: Any) -> str:
    """kohya writes ``str(value)``: ``True``, ``8.0``, ``None``; collections as JSON."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def kohya_metadata(
    record: Mapping[str, Any], name: str, adapter: str | None = None
) -> dict[str, str]:
    """The ``ss_*`` keys for a kohya-format file, from a :func:`training_record`.

    Keys whose fact the record lacks (e.g. a checkpoint exported without its run facts) are
    left out rather than guessed.

    Args:
        record: The run record.
        name: The LoRA's name (``ss_output_name``: A1111 lists the LoRA under it).
        adapter: The adapter type the tensors hold (default: the record's, else ``lora``).
    """
    adapter = adapter or record.get("adapter_type") or "lora"
    args = record.get("adapter_args") or {}
    arch = get_architecture(record.get("architecture", "sd1"))
    prediction = record.get("prediction_type", "epsilon")
    resolution = record.get("resolution")
    batch, accumulation = record.get("batch_size"), record.get("gradient_accumulation_steps")
    processes = record.get("num_processes", 1)
    schedule = record.get("lr_scheduler") or {}
    variant = record.get("model_variant", "")
    values: dict[str, Any] = {
        "ss_output_name": name,
        "ss_sd_model_name": record.get("base_model"),
        "ss_base_model_version": arch.version_string(prediction, variant),
        "ss_v2": arch.v2,
        "ss_network_module": LYCORIS_NETWORK_MODULE
        if adapter in LYCORIS_ALGO
        else KOHYA_NETWORK_MODULE,
        "ss_network_args": network_args(adapter, args),
        "ss_network_dim": record.get("rank"),
        "ss_network_alpha": record.get("alpha"),
        "ss_network_dropout": record.get("dropout"),
        "ss_resolution": f"({resolution}, {resolution})" if resolution else None,
        "ss_steps": record.get("steps"),
        "ss_max_train_steps": record.get("steps"),
        "ss_epoch": record.get("epochs") or None,
        "ss_num_epochs": record.get("epochs") or None,
        "ss_num_train_images": record.get("image_count") or None,
        "ss_tag_frequency": record.get("tag_frequency") or None,
        "ss_dataset_dirs": record.get("dataset_dirs") or None,
        "ss_learning_rate": record.get("learning_rate"),
        "ss_unet_lr": record.get("learning_rate"),
        # kohya records one text-encoder LR; for SDXL the first trained encoder's.
        "ss_text_encoder_lr": record.get("text_encoder_lr") or record.get("text_encoder_2_lr"),
        "ss_lr_scheduler": schedule.get("name"),
        "ss_lr_warmup_steps": record.get("warmup_updates"),
        "ss_optimizer": record.get("optimizer") or None,
        "ss_seed": record.get("seed"),
        "ss_batch_size_per_device": batch,
        "ss_total_batch_size": batch * accumulation * processes if batch and accumulation else None,
        "ss_gradient_accumulation_steps": accumulation,
        "ss_gradient_checkpointing": record.get("gradient_checkpointing"),
        "ss_mixed_precision": record.get("mixed_precision"),
        "ss_max_grad_norm": record.get("max_grad_norm"),
        "ss_noise_offset": record.get("noise_offset"),
        "ss_min_snr_gamma": record.get("snr_gamma"),
        "ss_caption_dropout_rate": record.get("caption_dropout"),
        "ss_flip_aug": record.get("random_flip"),
        "ss_random_crop": None
        if record.get("center_crop") is None
        else not record.get("center_crop"),
        "ss_shuffle_caption": record.get("shuffle_tags"),
        "ss_keep_tokens": record.get("keep_tokens"),
        "ss_enable_bucket": record.get("buckets"),
        "ss_min_bucket_reso": record.get("bucket_min_side"),
        "ss_max_bucket_reso": record.get("bucket_max_side"),
        "ss_cache_latents": None
        if record.get("cache_latents") is None
        else record.get("cache_latents") != "off",
        "ss_training_started_at": record.get("started_at"),
        "ss_training_finished_at": record.get("finished_at"),
        **_kohya_flow_matching(record),
    }
    return {k: _kohya_str(v) for k, v in values.items() if v is not None}


def _kohya_flow_matching(record: Mapping[str, Any]) -> dict[str, Any]:
    """The keys kohya's ``sd3_train_network.py`` adds for SD3 (``update_metadata``). kohya has
    one ``weighting_scheme`` for the density and the weighting: σ weightings imply its uniform
    density, so a weighting is named when there is one, else the density."""
    flow = record.get("flow_matching")
    if not flow:
        return {}
    weighting = flow.get("loss_weighting", "none")
    return {
        "ss_weighting_scheme": weighting if weighting != "none" else flow.get("timestep_density"),
        "ss_logit_mean": flow.get("logit_mean"),
        "ss_logit_std": flow.get("logit_std"),
        "ss_mode_scale": flow.get("mode_scale"),
        # Neither the CLIP nor the T5 attention mask is applied (as StableDiffusion3Pipeline).
        "ss_apply_lg_attn_mask": False,
        "ss_apply_t5_attn_mask": False,
    }


def modelspec_metadata(
    record: Mapping[str, Any], name: str, implementation: str | None = None
) -> dict[str, str]:
    """The SAI model spec keys (``modelspec.*``) of a LoRA, from a :func:`training_record`.

    Args:
        record: The run record.
        name: The title.
        implementation: Whose key names the file uses; default the architecture's (kohya
            files), ``"diffusers"`` for a diffusers-format file.
    """
    arch = get_architecture(record.get("architecture", "sd1"))
    prediction = record.get("prediction_type", "epsilon")
    resolution = record.get("resolution") or arch.resolution
    variant = record.get("model_variant", "")
    meta = {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "modelspec.architecture": arch.modelspec_architecture(prediction, variant),
        "modelspec.implementation": implementation or arch.implementation,
        "modelspec.title": name,
        "modelspec.resolution": f"{resolution}x{resolution}",
    }
    # The spec's prediction types are ε and v; a flow-matching model (SD3) is neither, and
    # the key is optional ("can"), so it is left out rather than written wrong.
    if prediction in ("epsilon", "v_prediction"):
        meta["modelspec.prediction_type"] = "v" if prediction == "v_prediction" else "epsilon"
    finished = record.get("finished_at")
    if finished is not None:
        when = datetime.datetime.fromtimestamp(float(finished), datetime.timezone.utc)
        meta["modelspec.date"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    return meta
