"""LoRA key names as the clients expect them, whatever library versions trained the LoRA.

Two spellings of the same adapters:

- **diffusers/PEFT** (``pytorch_lora_weights.safetensors``): ``<component>.<module path>.lora_A
  .weight`` / ``.lora_B.weight``, where the component is ``unet`` (SD3: ``transformer``),
  ``text_encoder`` or (SDXL, SD3) ``text_encoder_2``.
- **kohya** (what A1111/Forge, ComfyUI, SD.Next and kohya's scripts read): ``<prefix>_<module
  path with every "." replaced by "_">.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
  prefix ``lora_unet`` or the architecture's text-encoder prefix (``lora_te``; SDXL
  ``lora_te1``/``lora_te2``). That is kohya's own rule (``networks/lora.py`` builds
  ``prefix + "." + module + "." + child`` and replaces the dots). SD3's transformer is
  ``lora_transformer_<diffusers path>``, the name ComfyUI maps for SD3 (``comfy/lora.py``,
  ``model_lora_keys_unet``: OneTrainer's files), onto slices of its fused ``qkv`` where the
  diffusers model has separate ``to_q``/``to_k``/``to_v``.

Text-encoder module paths are **canonical**: they always carry the ``text_model.`` level that
``CLIPTextModel`` had up to transformers 4 (``text_model.encoder.layers.0.self_attn.q_proj``).
transformers 5 dropped that level from ``named_modules()``, so the live model may lack it; we add
it on save and strip it again when loading into such a model. Every SD client matches the
canonical path (kohya, ComfyUI ``comfy/lora.py``, A1111 ``networks.py``), and diffusers maps it
onto a flattened model itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from trainer.models.architectures import Architecture

TEXT_MODEL = "text_model"
# The children of transformers' CLIPTextTransformer: a path starting with one of these sits
# below the text_model level (CLIPTextModelWithProjection's text_projection does not).
_TEXT_MODEL_CHILDREN = ("embeddings", "encoder", "final_layer_norm")
PEFT_DOWN, PEFT_UP = "lora_A.weight", "lora_B.weight"
KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
# DoRA's magnitude: peft's key in the diffusers file, and the kohya/LyCORIS key clients read.
PEFT_MAGNITUDE, KOHYA_DORA_SCALE = "lora_magnitude_vector", "dora_scale"
# peft's LoHa and LoKr tensors carry LyCORIS' own names, in both files.
LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
PEFT_SUFFIXES = (PEFT_DOWN, PEFT_UP, PEFT_MAGNITUDE, *LOHA_TENSORS, *LOKR_TENSORS)
UNET = "unet"
TRANSFORMER = "transformer"  # SD3's denoiser, as diffusers names it
DENOISERS = (UNET, TRANSFORMER)
KOHYA_TRANSFORMER = "lora_transformer"


def denoiser_component(model: torch.nn.Module) -> str:
    """The diffusers component name of a denoising model: ``transformer`` for SD3's MMDiT
    (``SD3Transformer2DModel``), ``unet`` for a UNet."""
    return TRANSFORMER if type(model).__name__ == "SD3Transformer2DModel" else UNET


# ---------------------------------------------------------------- the text_model level


def canonical_text_path(path: str) -> str:
    """A text-encoder module path with the ``text_model.`` level, as transformers 4 names it."""
    head = path.split(".", 1)[0]
    return f"{TEXT_MODEL}.{path}" if head in _TEXT_MODEL_CHILDREN else path


def live_text_path(canonical: str, has_text_model: bool) -> str:
    """The canonical path as the live model names it (no ``text_model.`` under transformers 5)."""
    prefix = TEXT_MODEL + "."
    if not has_text_model and canonical.startswith(prefix):
        return canonical[len(prefix) :]
    return canonical


def has_text_model_level(model: torch.nn.Module) -> bool:
    """Whether the model's module paths start with ``text_model.`` (transformers 4 CLIP)."""
    return isinstance(getattr(model, TEXT_MODEL, None), torch.nn.Module)


def is_text_component(component: str) -> bool:
    """``text_encoder``, ``text_encoder_2``, ...: the diffusers names of text encoders."""
    return component.startswith("text_encoder")


# ---------------------------------------------------------------- diffusers/PEFT keys


def split_peft_key(key: str) -> tuple[str, str, str]:
    """``unet.a.b.lora_A.weight`` → (``unet``, ``a.b``, ``lora_A.weight``); also DoRA's
    ``lora_magnitude_vector`` and the LoHa/LoKr tensors (``….hada_w1_a``, ``….lokr_w1``).

    Raises:
        ValueError: for a key that is not a component-prefixed PEFT adapter tensor.
    """
    component, _, rest = key.partition(".")
    for suffix in PEFT_SUFFIXES:
        if rest.endswith("." + suffix):
            return component, rest[: -len(suffix) - 1], suffix
    raise ValueError(
        f"{key!r} is not a PEFT adapter tensor (….lora_A.weight / ….lora_B.weight, "
        "….lora_magnitude_vector, ….hada_*, ….lokr_*)"
    )


def adapter_type(keys: Iterable[str]) -> str:
    """``lora``, ``dora``, ``loha`` or ``lokr``: the type of a diffusers-format state dict's
    adapters, told from its tensor names (``lora`` when it holds none of the others)."""
    suffixes = {split_peft_key(k)[2] for k in keys}
    if suffixes & set(LOHA_TENSORS):
        return "loha"
    if suffixes & set(LOKR_TENSORS):
        return "lokr"
    return "dora" if PEFT_MAGNITUDE in suffixes else "lora"


def canonical_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-format state dict with every text-encoder path in canonical form.

    Accepts files written with or without the ``text_model.`` level (ours before this fix,
    trained under transformers 5, lack it).
    """
    out = {}
    for key, value in state.items():
        component, path, suffix = split_peft_key(key)
        if is_text_component(component):
            path = canonical_text_path(path)
        out[f"{component}.{path}.{suffix}"] = value
    return out


# ---------------------------------------------------------------- kohya keys


# diffusers ResnetBlock2D children → the original (LDM) ResBlock's, in kohya's SDXL UNet,
# ComfyUI's comfy/utils.py map and A1111's networks.py.
_LDM_RESNET = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
    "norm1": "in_layers.0",
    "norm2": "out_layers.0",
}
_LDM_TOP = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "conv_norm_out": "out.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)")
_MID = re.compile(r"mid_block\.(attentions|resnets)\.(\d+)")
# SDXL base: the up blocks that hold attention (the third has none), so the upsampler sits
# after [resnet, attention] at index 2 in blocks 0 and 1.
SDXL_UP_BLOCKS_WITH_ATTENTION = frozenset({0, 1})


def _resnet_child(rest: str) -> str:
    head, _, tail = rest.partition(".")
    mapped = _LDM_RESNET.get(head, head)
    return f"{mapped}.{tail}" if tail else mapped


def ldm_unet_path(
    path: str,
    layers_per_block: int = 2,
    up_blocks_with_attention: Iterable[int] = SDXL_UP_BLOCKS_WITH_ATTENTION,
) -> str | None:
    """A diffusers UNet module path in the original checkpoint's (LDM/SGM) block layout.

    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` →
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``. Each down level holds
    ``layers_per_block`` resnet(+attention) blocks and then a downsampler; each up level one
    more, then an upsampler after the resnet (and the attention, where there is one).
    Returns None for a path with no place in that layout.
    """
    for diffusers_name, ldm_name in _LDM_TOP.items():
        if path == diffusers_name or path.startswith(diffusers_name + "."):
            return ldm_name + path[len(diffusers_name) :]
    if m := _MID.match(path):
        kind, j, rest = m.group(1), int(m.group(2)), path[m.end() + 1 :]
        if kind == "attentions":
            return f"middle_block.1.{rest}" if rest else "middle_block.1"
        return f"middle_block.{2 * j}.{_resnet_child(rest)}" if rest else f"middle_block.{2 * j}"
    m = _BLOCK.match(path)
    if not m:
        return None
    side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    rest = path[m.end() + 1 :]
    if side == "down":
        if kind == "downsamplers":
            return f"input_blocks.{(layers_per_block + 1) * (i + 1)}.0.op"
        block = f"input_blocks.{1 + (layers_per_block + 1) * i + j}"
    else:
        per_level = layers_per_block + 1
        if kind == "upsamplers":
            index = 2 if i in set(up_blocks_with_attention) else 1
            return f"output_blocks.{per_level * i + per_level - 1}.{index}.conv"
        block = f"output_blocks.{per_level * i + j}"
    if kind == "attentions":
        return f"{block}.1.{rest}" if rest else f"{block}.1"
    return f"{block}.0.{_resnet_child(rest)}" if rest else f"{block}.0"


def kohya_name(component: str, path: str, arch: Architecture) -> str:
    """The kohya module name (the key before ``.lora_down.weight``) of one adapted module.

    Args:
        component: ``unet``, SD3's ``transformer``, or a text-encoder component
            (``text_encoder``, ``text_encoder_2``).
        path: The module path inside that component (text-encoder paths are made canonical).
        arch: The base-model family; it picks the prefixes and the UNet naming.

    Raises:
        ValueError: for a component the family lacks, or a UNet module with no place in the
            original layout when the family's kohya files use it.
    """
    if component == UNET:
        prefix = "lora_unet"
        if arch.kohya_unet_style == "ldm":
            mapped = ldm_unet_path(path)
            if mapped is None:
                raise ValueError(
                    f"unet.{path}: no counterpart in the original {arch.name} UNet layout, so "
                    "kohya-format clients could not load it; adapt another module"
                )
            path = mapped
    elif component == TRANSFORMER:
        prefix = KOHYA_TRANSFORMER
    elif is_text_component(component):
        prefix = arch.kohya_text_prefix(component)
        path = canonical_text_path(path)
    else:
        raise ValueError(f"{component!r}: not a UNet, transformer or text-encoder component")
    return f"{prefix}_{path.replace('.', '_')}"


def to_kohya(
    state: Mapping[str, torch.Tensor],
    arch: Architecture,
    alphas: Mapping[str, float],
    ranks: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename a diffusers-format state dict to kohya/LyCORIS keys, with an ``.alpha`` per module.

    Per module ``<name>`` (:func:`kohya_name`), by adapter type:

    - LoRA: ``.lora_down.weight`` (peft's ``lora_A``), ``.lora_up.weight`` (``lora_B``);
    - DoRA: the same plus ``.dora_scale``, the per-input magnitude ``(1, in[, 1, 1])``;
    - LoHa: ``.hada_w1_a``, ``.hada_w1_b``, ``.hada_w2_a``, ``.hada_w2_b`` (``.hada_t1``,
      ``.hada_t2`` for a Tucker-decomposed convolution);
    - LoKr: ``.lokr_w1`` or ``.lokr_w1_a``/``_b``, ``.lokr_w2`` or ``.lokr_w2_a``/``_b``
      (``.lokr_t2``).

    Args:
        state: Diffusers-format tensors (``<component>.<path>.<tensor>``).
        arch: The base-model family.
        alphas: The alpha of each component (``{"unet": 8.0, "text_encoder": 8.0}``). Clients
            scale a module by ``alpha / rank``, the rank read from its tensors, as peft does.
        ranks: The rank of each component: needed for a LoKr module whose two factors are
            both full matrices, which the clients apply unscaled (no tensor holds a rank), so
            peft's ``alpha / rank`` is folded into ``lokr_w1``.

    Raises:
        ValueError: a component without an alpha (or a needed rank), or a per-output DoRA
            magnitude, which no kohya-format client applies correctly.
    """
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        component, path, suffix = split_peft_key(key)
        modules.setdefault((component, path), {})[suffix] = value
    out: dict[str, torch.Tensor] = {}
    for (component, path), tensors in modules.items():
        if component not in alphas:
            raise ValueError(f"no alpha known for {component!r} (needed for {component}.{path})")
        alpha = float(alphas[component])
        name = kohya_name(component, path, arch)
        rank = (ranks or {}).get(component)
        for suffix, value in _kohya_tensors(f"{component}.{path}", tensors, alpha, rank).items():
            out[f"{name}.{suffix}"] = value
        out[f"{name}.{KOHYA_ALPHA}"] = torch.tensor(alpha)
    return out


def _kohya_tensors(
    where: str, tensors: Mapping[str, torch.Tensor], alpha: float, rank: int | None
) -> dict[str, torch.Tensor]:
    """One module's tensors under their kohya/LyCORIS names (without the ``.alpha``)."""
    renamed = {PEFT_DOWN: KOHYA_DOWN, PEFT_UP: KOHYA_UP, PEFT_MAGNITUDE: KOHYA_DORA_SCALE}
    out = {renamed.get(suffix, suffix): value for suffix, value in tensors.items()}
    magnitude = out.get(KOHYA_DORA_SCALE)
    if magnitude is not None and magnitude.dim() < 2:
        raise ValueError(
            f"{where}: a per-output DoRA magnitude (lora.dora_axis = 'output'); A1111/Forge and "
            "ComfyUI apply dora_scale per input column, so no kohya file can hold it"
        )
    if "lokr_w1" in out and "lokr_w2" in out:
        if rank is None:
            raise ValueError(f"{where}: a full×full LoKr module needs the adapter's rank")
        out["lokr_w1"] = out["lokr_w1"] * (alpha / rank)
    return out
