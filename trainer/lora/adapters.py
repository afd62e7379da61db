"""Attach peft adapters (LoRA, DoRA, LoHa, LoKr), and save / load them in the diffusers
LoRA file format.

``lora.type`` picks peft's config: ``LoraConfig`` (``use_dora`` for DoRA, whose magnitude is
then taken per input column, ``trainer/lora/dora.py``), ``LoHaConfig`` or ``LoKrConfig``. peft's
LoHa and LoKr layers hold the tensors LyCORIS defines, under LyCORIS' names and with its
formulas, so ``trainer/lora/keys.py`` writes them in the kohya/LyCORIS format as they are.

The file is ``pytorch_lora_weights.safetensors`` with PEFT keys under ``unet.`` (SD3:
``transformer.``), ``text_encoder.`` and (SDXL, SD3) ``text_encoder_2.`` prefixes, plus the
adapter config (rank, alpha, targets) in the header under diffusers' ``lora_adapter_metadata``
key, so ``pipe.load_lora_weights(folder)`` restores the exact scale. Our own training metadata sits
beside it in the same header.

Text-encoder keys are written in canonical form (``text_encoder.text_model.encoder…``) whatever
the installed transformers calls the modules, and mapped back onto the live model on load; see
``trainer/lora/keys.py``. The file is written atomically with normal permissions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import torch
from peft import LoHaConfig, LoKrConfig, PeftConfig, inject_adapter_in_model
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedConfig

from trainer.config.load import ConfigError, LoraConfig
from trainer.lora import dora
from trainer.lora import keys as lora_keys
from trainer.lora.files import (
    load_tensors,
    read_header,
    save_state,
)
from trainer.lora.targets import target_problems
from trainer.models.accessors import attribute
from trainer.models.dtypes import DTYPES

# The text encoders to train by component name (None: absent), or the one text encoder, or None.
TextEncoders: TypeAlias = Mapping[str, torch.nn.Module | None] | torch.nn.Module | None


def _peft_config(
    config: LoraConfig, targets: tuple[str, ...], layers: Sequence[int] | None = None
) -> PeftConfig:
    """The peft config of ``lora.type`` for one model's targets (only in ``layers`` of a
    text encoder's ``encoder.layers.N`` when given)."""
    kwargs: dict[str, Any] = {}
    if layers is not None:
        kwargs = {"layers_to_transform": list(layers), "layers_pattern": "layers"}
    if config.type in ("loha", "lokr"):
        # Any: each value goes to its own typed keyword of peft's configs.
        common: dict[str, Any] = {
            "r": config.rank,
            "alpha": config.alpha,
            "rank_dropout": config.rank_dropout,
            "module_dropout": config.module_dropout,
            "use_effective_conv2d": config.conv_tucker,
            "target_modules": list(targets),
            **kwargs,
        }
        if config.type == "loha":
            return LoHaConfig(**common)
        return LoKrConfig(
            **common,
            decompose_factor=config.factor,
            decompose_both=config.decompose_both,
        )
    return PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,  # type: ignore[arg-type]  # peft says int; alpha / r takes a float
        lora_dropout=config.dropout,
        target_modules=list(targets),
        use_dora=config.type == "dora",
        # Gaussian A and zero B, as the diffusers scripts do: the adapter starts as a no-op.
        init_lora_weights="gaussian",
        **kwargs,
    )


def _components(unet: torch.nn.Module, text_encoders: TextEncoders) -> dict[str, torch.nn.Module]:
    """``{"unet": ..., "text_encoder": ..., "text_encoder_2": ...}`` without the absent ones
    (SD3's transformer under ``transformer``); a lone module is the first text encoder (SD
    1.x/2.x callers)."""
    named: dict[str, torch.nn.Module | None]
    if isinstance(text_encoders, Mapping):
        named = dict(text_encoders)
    else:
        named = {"text_encoder": text_encoders}
    denoiser = lora_keys.denoiser_component(unet)
    return {denoiser: unet, **{k: v for k, v in named.items() if v is not None}}


def attach(
    unet: torch.nn.Module,
    text_encoders: TextEncoders,
    config: LoraConfig,
    unused_layers: Mapping[str, int] | None = None,
) -> None:
    """Add trainable LoRA adapters in place; trainable params are fp32 whatever the base dtype.

    fp32 adapters matter under fp16 AMP: fp16 master weights lose small updates and the
    GradScaler refuses to unscale fp16 gradients (diffusers #8871).

    Args:
        unet: The UNet.
        text_encoders: The text encoders to train, by component name (``text_encoder``,
            ``text_encoder_2``), or one text encoder, or None.
        config: The ``[lora]`` table.
        unused_layers: Per text encoder, how many of its last layers the conditioning never
            reads (SDXL's first encoder: 1, as SDXL conditions on the penultimate states).
            They get no adapter: it would never train, and under DDP a parameter that gets
            no gradient stops the run.
    """
    encoders = {
        k: v for k, v in _components(unet, text_encoders).items() if k not in lora_keys.DENOISERS
    }
    # Checked on the live modules too: a single-file model skips the config-time check.
    problems = target_problems("lora.target_modules", config.target_modules, unet)
    key = "lora.text_encoder_target_modules"
    for encoder in encoders.values():
        problems += target_problems(key, config.text_encoder_target_modules, encoder)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    _add_adapter(unet, "lora.target_modules", config.target_modules, config)
    for name, encoder in encoders.items():
        skip = (unused_layers or {}).get(name, 0)
        layers = None
        if skip:
            layers = range(attribute(encoder, "config", PreTrainedConfig).num_hidden_layers - skip)
        _add_adapter(encoder, key, config.text_encoder_target_modules, config, layers)
    for module in (unet, *encoders.values()):
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()


def _add_adapter(
    model: torch.nn.Module,
    key: str,
    targets: tuple[str, ...],
    config: LoraConfig,
    layers: Sequence[int] | None = None,
) -> None:
    peft_config = _peft_config(config, targets, layers)
    try:
        # Through peft itself for every component, not the models' own ``add_adapter``:
        # transformers' refuses to run when it dislikes the installed peft's version (5.24
        # wants peft >= 0.22 for features we do not use), which would stop text-encoder
        # training over a check this code does not need.
        inject_adapter_in_model(peft_config, model, adapter_name=dora.ADAPTER)
    except ValueError as err:  # e.g. a target that names a block, not a layer peft can adapt
        first = str(err).splitlines()[0]
        raise ConfigError([f"{key}: peft cannot adapt these modules ({first})"]) from err
    # What the libraries' own add_adapter records: peft's state-dict helpers read the config
    # from ``peft_config``; the no-path base model keeps local folders out of the file.
    peft_config.base_model_name_or_path = None
    # (torch's stub of Module.__setattr__ admits only tensors and modules.)
    model.peft_config = {dora.ADAPTER: peft_config}  # type: ignore[assignment]  # see above
    if config.type == "dora" and config.dora_axis == "input":
        dora.use_input_axis(model)


def _lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Embeddings are never adapted here, so peft need not look for a vocabulary change.
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def _adapter_metadata(model: torch.nn.Module) -> dict:
    config = attribute(model, "peft_config", dict)[dora.ADAPTER].to_dict()
    # JSON cannot hold sets; diffusers stores target_modules as a list.
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save(
    folder: str | Path,
    unet: torch.nn.Module,
    text_encoder: TextEncoders,
    dtype: str = "fp32",
    training_metadata: Mapping[str, object] | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` and return its path.

    Args:
        folder: Destination folder (created).
        unet: The UNet with adapters (unwrapped from DDP).
        text_encoder: The trained text encoders by component name (``{"text_encoder": te1,
            "text_encoder_2": te2}``), or the one trained text encoder, or None.
        dtype: ``fp16``, ``bf16`` or ``fp32``.
        training_metadata: JSON-able facts about the run for the header; absolute paths in
            it are reduced to their last part, so a shared file does not reveal a user's
            folders.
        extra_metadata: More header entries (string values), e.g. the ``modelspec.*`` keys.
    """
    state, packed = collect(_components(unet, text_encoder))
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}
    return save_state(folder, tensors, packed, training_metadata, extra_metadata)


def collect(
    components: Mapping[str, torch.nn.Module],
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The LoRA tensors (canonical keys, on the CPU) and diffusers' packed adapter config.

    Args:
        components: The adapted models by diffusers component name (``unet`` or SD3's
            ``transformer``, ``text_encoder``, and for SDXL/SD3 ``text_encoder_2``), unwrapped
            from DDP.
    """
    state: dict[str, torch.Tensor] = {}
    packed: dict[str, object] = {}
    for name, model in components.items():
        state.update({f"{name}.{k}": v.detach().cpu() for k, v in _lora_tensors(model).items()})
        packed.update({f"{name}.{k}": v for k, v in _adapter_metadata(model).items()})
    return lora_keys.canonical_state(state), packed


def _live_state(
    state: Mapping[str, torch.Tensor], component: str, model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """The file's tensors of one component, keyed as that live model's peft state dict.

    Files hold canonical text-encoder paths (``text_model.encoder…``); older files trained
    under transformers 5 hold ``encoder…``. Both are mapped onto whichever the model has.
    """
    sub = {k[len(component) + 1 :]: v for k, v in state.items() if k.startswith(component + ".")}
    if not lora_keys.is_text_component(component):
        return sub
    nested = lora_keys.has_text_model_level(model)
    return {
        lora_keys.live_text_path(lora_keys.canonical_text_path(k), nested): v
        for k, v in sub.items()
    }


# The config key that turns each text encoder's adapters on, for messages.
_TRAIN_KEY = {
    "text_encoder": "lora.train_text_encoder",
    "text_encoder_2": "lora.train_text_encoder_2",
}


def load_into(
    path: str | Path,
    unet: torch.nn.Module,
    text_encoder: TextEncoders,
) -> None:
    """Load a file written by :func:`save` back into models that already have adapters.

    Args:
        path: The file.
        unet: The UNet with adapters.
        text_encoder: The trained text encoders by component name, or the one trained text
            encoder, or None.

    Raises:
        LoraFileError: the file is missing, truncated or not safetensors.
        ValueError: if the file's tensors do not match the adapters exactly.
    """
    state = load_tensors(read_header(path))
    parts = _components(unet, text_encoder)
    for component in sorted({lora_keys.split_peft_key(k)[0] for k in state} - set(parts)):
        key = _TRAIN_KEY.get(component, component)
        raise ValueError(f"{path}: holds {component} LoRA but {key} is false")
    for prefix, model in parts.items():
        sub = _live_state(state, prefix, model)
        expected = _lora_tensors(model)
        if set(sub) != set(expected):
            missing = sorted(set(expected) - set(sub))[:3]
            extra = sorted(set(sub) - set(expected))[:3]
            raise ValueError(
                f"{path}: {prefix} adapter keys do not match the configured adapters "
                f"(missing {missing}, unexpected {extra}); was lora.type, rank or "
                "target_modules changed?"
            )
        for key, value in sub.items():
            if value.shape != expected[key].shape:
                raise ValueError(
                    f"{path}: {prefix}.{key} has shape {tuple(value.shape)}, "
                    f"the adapter expects {tuple(expected[key].shape)}"
                )
        # torch's load_state_dict result (peft annotates it as `namedtuple`, the function).
        unexpected = getattr(set_peft_model_state_dict(model, sub), "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"{path}: unexpected keys {unexpected[:3]}")
