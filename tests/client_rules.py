"""The LoRA key rules of the clients, written independently of the trainer, for the tests.

Each rule was read in the client's own code and is restated here in our words; nothing here
imports ``trainer``, so a test that compares the trainer's names with these rules compares two
independent implementations.

- kohya sd-scripts ``networks/lora.py`` (``LoRANetwork.create_modules``): walk
  ``named_modules()``; inside every module whose class is a target (UNet:
  ``Transformer2DModel``, and when loading a file also ``ResnetBlock2D``, ``Downsample2D``,
  ``Upsample2D``; text encoder: ``CLIPAttention``, ``CLIPMLP``) take each ``Linear``/``Conv2d``
  child; its name is ``prefix + "." + module + "." + child`` with every ``.`` replaced by
  ``_``. Prefixes: ``lora_unet``; ``lora_te`` with one text encoder, ``lora_te1``/``lora_te2``
  with two. kohya runs on transformers 4, whose ``CLIPTextModel`` has a ``text_model`` level.
  Keys naming no created module are ignored (``load_state_dict(strict=False)``).
- ComfyUI ``comfy/lora.py`` (``model_lora_keys_unet``/``_clip``) with ``comfy/utils.py``
  (``unet_to_diffusers``): a UNet LoRA key is ``lora_unet_`` + a diffusers UNet weight's module
  path with ``_`` for ``.``; a CLIP key is ``lora_te_text_model_encoder_layers_{i}_{x}`` (also
  ``lora_te1_``) for x in the six projections below. Other keys: "lora key not loaded".
- A1111 ``extensions-builtin/Lora/networks.py`` (``convert_diffusers_name_to_compvis``):
  diffusers-style kohya names are rewritten to the original (CompVis) module names, which are
  looked up among the loaded model's modules; misses are dropped.
"""

from __future__ import annotations

import re

import torch

UNET_BLOCK_CLASSES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_BLOCK_CLASSES = ("CLIPAttention", "CLIPMLP")
COMFY_CLIP_LAYERS = (
    "mlp_fc1",
    "mlp_fc2",
    "self_attn_k_proj",
    "self_attn_q_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
)


class WithTextModel(torch.nn.Module):
    """A transformers-5 ``CLIPTextModel`` seen as transformers 4 lays it out: its modules one
    level down, under ``text_model``."""

    def __init__(self, flat: torch.nn.Module) -> None:
        super().__init__()
        self.text_model = flat

    def forward(self, *args, **kwargs):
        return self.text_model(*args, **kwargs)


def as_transformers4(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The text encoder with a ``text_model`` level, whichever transformers built it."""
    if isinstance(getattr(text_encoder, "text_model", None), torch.nn.Module):
        return text_encoder
    return WithTextModel(text_encoder)


def as_transformers5(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The text encoder without a ``text_model`` level."""
    inner = getattr(text_encoder, "text_model", None)
    return inner if isinstance(inner, torch.nn.Module) else text_encoder


def _kohya_modules(root: torch.nn.Module, prefix: str, classes) -> set[str]:
    names = set()
    for name, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            if type(child).__name__ in ("Linear", "Conv2d") and child_name:
                names.add(f"{prefix}.{name}.{child_name}".replace(".", "_"))
    return names


def kohya_names(unet: torch.nn.Module, text_encoders: list[torch.nn.Module]) -> set[str]:
    """Every module name kohya creates when it loads a LoRA for these models.

    ``text_encoders`` must be laid out as transformers 4 does (see :func:`as_transformers4`).
    """
    names = _kohya_modules(unet, "lora_unet", UNET_BLOCK_CLASSES)
    for i, encoder in enumerate(text_encoders):
        prefix = "lora_te" if len(text_encoders) == 1 else f"lora_te{i + 1}"
        names |= _kohya_modules(encoder, prefix, TEXT_BLOCK_CLASSES)
    return names


def comfy_sd1_names(unet: torch.nn.Module, text_layers: int) -> set[str]:
    """Every kohya-style module name ComfyUI maps for an SD1 model."""
    names = {
        "lora_unet_" + name.replace(".", "_")
        for name, module in unet.named_modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor) and name
    }
    for i in range(text_layers):
        for layer in COMFY_CLIP_LAYERS:
            for prefix in ("lora_te", "lora_te1"):
                names.add(f"{prefix}_text_model_encoder_layers_{i}_{layer}")
    return names


# ---------------------------------------------------------------- A1111


_RESNET_SUFFIXES = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def a1111_compvis(name: str) -> str:
    """A1111's rewrite of a diffusers-style SD1 kohya name to the CompVis module name."""
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _RESNET_SUFFIXES.get(rest, rest) if kind == "resnets" else rest
        index = 1 if kind == "attentions" else 0
        return f"diffusion_model_input_blocks_{1 + 3 * i + j}_{index}_{rest}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name):
        kind, j, rest = m[1], int(m[2]), m[3]
        rest = _RESNET_SUFFIXES.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else 2 * j}_{rest}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _RESNET_SUFFIXES.get(rest, rest) if kind == "resnets" else rest
        return (
            f"diffusion_model_output_blocks_{3 * i + j}_{1 if kind == 'attentions' else 0}_{rest}"
        )
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", name):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return name


def sd15_compvis_attention_names(text_layers: int = 12) -> set[str]:
    """The attention and CLIP projection module names of an original SD-1.5 checkpoint.

    From SD-1.5's published layout (``v1-inference.yaml``: two ResBlocks per level, spatial
    transformers of depth 1 at levels 0-2, none at level 3): ``input_blocks`` 1, 2, 4, 5, 7, 8,
    ``middle_block.1`` and ``output_blocks`` 3-11 hold a SpatialTransformer at index 1.
    """
    blocks = [f"input_blocks_{i}_1" for i in (1, 2, 4, 5, 7, 8)]
    blocks += ["middle_block_1"] + [f"output_blocks_{i}_1" for i in range(3, 12)]
    names = set()
    for block in blocks:
        for attn in ("attn1", "attn2"):
            for leaf in ("to_q", "to_k", "to_v", "to_out_0"):
                names.add(f"diffusion_model_{block}_transformer_blocks_0_{attn}_{leaf}")
    for i in range(text_layers):
        for leaf in COMFY_CLIP_LAYERS:  # the same six projections per CLIP layer
            names.add(f"transformer_text_model_encoder_layers_{i}_{leaf}")
    return names


def sdxl_kohya_attention_names(level_depths: tuple[int, int] = (2, 10)) -> set[str]:
    """kohya's names for the attention projections of SDXL base (``sdxl_original_unet.py``).

    Its UNet keeps the original layout: transformers of depth 2 in ``input_blocks`` 4-5 and
    ``output_blocks`` 3-5, of depth 10 in ``input_blocks`` 7-8, ``middle_block.1`` and
    ``output_blocks`` 0-2; each at index 1 of its block. ``level_depths`` gives the two depths
    for a model of the same layout at other depths (the tests' tiny SDXL).
    """
    middle, deep = level_depths
    depths = {f"input_blocks_{i}_1": middle for i in (4, 5)}
    depths |= {f"input_blocks_{i}_1": deep for i in (7, 8)}
    depths |= {"middle_block_1": deep}
    depths |= {f"output_blocks_{i}_1": deep for i in (0, 1, 2)}
    depths |= {f"output_blocks_{i}_1": middle for i in (3, 4, 5)}
    names = set()
    for block, depth in depths.items():
        for t in range(depth):
            for attn in ("attn1", "attn2"):
                for leaf in ("to_q", "to_k", "to_v", "to_out_0"):
                    names.add(f"lora_unet_{block}_transformer_blocks_{t}_{attn}_{leaf}")
    return names


def module_name(kohya_key: str) -> str:
    """The module part of a kohya key (everything before the first dot)."""
    return kohya_key.split(".", 1)[0]


# ---------------------------------------------------------------- real shapes, no memory


def sd15_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """An SD-1.5-shaped UNet and CLIP text encoder (published configs) on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
            )
        )
    return unet, text


def sdxl_unet() -> torch.nn.Module:
    """An SDXL-base-shaped UNet (published config) on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )


# ---------------------------------------------------------------- tensors per module

# The tensor parts each client reads for one module of each adapter type (A1111's
# network_lora/_hada/_lokr.py ``create_module`` and ComfyUI's weight_adapter ``load``), beyond
# the ``alpha`` every module carries; LoKr takes each factor full or as an ``_a``/``_b`` pair.
MODULE_PARTS = {
    "lora": [{"lora_up.weight", "lora_down.weight"}],
    "dora": [{"lora_up.weight", "lora_down.weight", "dora_scale"}],
    "loha": [
        {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
        {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    ],
    "lokr": [
        one | two
        for one in ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
        for two in ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"}, {"lokr_w2_a", "lokr_w2_b", "lokr_t2"})
    ],
}


def module_parts(kohya: dict) -> dict[str, set[str]]:
    """``{module name: its tensor parts}`` of a kohya-format state dict."""
    parts: dict[str, set[str]] = {}
    for key in kohya:
        name, _, part = key.partition(".")
        parts.setdefault(name, set()).add(part)
    return parts


# ---------------------------------------------------------------- SD3 in ComfyUI

# comfy/utils.py ``mmdit_to_diffusers``: the diffusers module paths of one joint block that
# ComfyUI maps onto its MMDiT (SAI layout); to_q/to_k/to_v and add_q/k/v_proj onto slices of
# the fused x_block / context_block ``attn.qkv``, attn2.to_q/k/v onto ``x_block.attn2.qkv``,
# the rest (``MMDIT_MAP_BLOCK``) one to one. Generated for every block, whether or not the
# block has the module.
COMFY_MMDIT_BLOCK = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
    "attn.add_v_proj", "attn2.to_q", "attn2.to_k", "attn2.to_v",
    "norm1_context.linear", "attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2",
    "attn.norm_added_q", "attn.norm_added_k", "norm1.linear", "attn.to_out.0", "attn.norm_q",
    "attn.norm_k", "attn2.to_out.0", "attn2.norm_q", "attn2.norm_k", "ff.net.0.proj", "ff.net.2",
)  # fmt: skip


def comfy_sd3_names(num_blocks: int, clip_layers: tuple[int, int]) -> set[str]:
    """Every LoRA module name ComfyUI maps for an SD3 model (CLIP-L, CLIP-G and T5 loaded).

    ``comfy/lora.py`` ``model_lora_keys_unet`` for an ``SD3`` model: each diffusers path ``p``
    of :data:`COMFY_MMDIT_BLOCK` in ``transformer_blocks.{i}`` as ``transformer.p`` (diffusers),
    ``base_model.model.p``, ``lora_transformer_`` + p with ``_`` (OneTrainer) and ``lycoris_``
    + p with ``_``; ``model_lora_keys_clip``: with clip_l present, CLIP-L's six projections per
    layer as ``lora_te1_text_model_encoder_layers_{i}_{x}`` (and ``lora_te_…``, and the
    diffusers ``text_encoder.text_model.encoder.layers.{i}.{x}``), CLIP-G's as ``lora_te2_…``
    and ``text_encoder_2.text_model…``.
    """
    names = set()
    for i in range(num_blocks):
        for path in COMFY_MMDIT_BLOCK:
            full = f"transformer_blocks.{i}.{path}"
            flat = full.replace(".", "_")
            names |= {f"transformer.{full}", f"base_model.model.{full}"}
            names |= {f"lora_transformer_{flat}", f"lycoris_{flat}"}
    clip_map = {
        "mlp.fc1": "mlp_fc1",
        "mlp.fc2": "mlp_fc2",
        "self_attn.k_proj": "self_attn_k_proj",
        "self_attn.q_proj": "self_attn_q_proj",
        "self_attn.v_proj": "self_attn_v_proj",
        "self_attn.out_proj": "self_attn_out_proj",
    }
    for encoder, layers in enumerate(clip_layers, start=1):
        diffusers = "text_encoder" if encoder == 1 else "text_encoder_2"
        kohya = ("lora_te", "lora_te1") if encoder == 1 else ("lora_te2",)
        for i in range(layers):
            for dotted, flat in clip_map.items():
                names |= {f"{p}_text_model_encoder_layers_{i}_{flat}" for p in kohya}
                names.add(f"{diffusers}.text_model.encoder.layers.{i}.{dotted}")
    return names
