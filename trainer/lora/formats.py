"""Tell which LoRA format a file uses and group its tensors into adapted modules.

Recognised, by their documented key conventions:

- **kohya** (sd-scripts ``networks/lora.py``; what A1111/Forge, ComfyUI and SD.Next read):
  ``lora_unet_<path>`` / ``lora_te_<path>`` (SDXL, SD3 ``lora_te1_``/``lora_te2_``; SD3's
  transformer ``lora_transformer_<path>`` as ComfyUI maps it) with
  ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` (``.lora_mid.weight`` for LoCon's
  CP decomposition, ``.dora_scale`` for DoRA).
- **LyCORIS** (the same names with its own tensors): LoHa ``hada_w1_a``…, LoKr ``lokr_w1``…,
  full ``diff``, norm ``w_norm``, GLoRA ``a1.weight``…; and plain LoRA/LoCon tensors when
  ``ss_network_module`` names LyCORIS.
- **diffusers/PEFT**: ``<component>.<path>.lora_A.weight`` / ``lora_B.weight`` (component
  ``unet`` or SD3's ``transformer``, ``text_encoder``, ``text_encoder_2``), rank and alpha in
  the header's ``lora_adapter_metadata``; and the older diffusers attention-processor keys
  (``…attn1.processor.to_q_lora.down.weight``, ``…q_proj.lora_linear_layer.down.weight``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from trainer.lora.files import Header

KOHYA_COMPONENTS = {
    "lora_unet": "unet",
    "lora_transformer": "transformer",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "text_encoder_3",
}
_KOHYA_NAME = re.compile(r"^(lora_unet|lora_transformer|lora_te[123]?)_")
PEFT_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
# Suffix after the module name → (module kind, role). Roles "down"/"up" carry the shapes.
_KOHYA_SUFFIXES = {
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_mid.weight": ("lora", "mid"),
    "alpha": ("", "alpha"),
    "dora_scale": ("dora", "dora"),
    "hada_w1_a": ("loha", "up"),
    "hada_w1_b": ("loha", "down"),
    "hada_w2_a": ("loha", ""),
    "hada_w2_b": ("loha", ""),
    "hada_t1": ("loha", ""),
    "hada_t2": ("loha", ""),
    "lokr_w1": ("lokr", ""),
    "lokr_w2": ("lokr", ""),
    "lokr_w1_a": ("lokr", ""),
    "lokr_w1_b": ("lokr", ""),
    "lokr_w2_a": ("lokr", ""),
    "lokr_w2_b": ("lokr", "down"),
    "lokr_t2": ("lokr", ""),
    "diff": ("full", ""),
    "diff_b": ("full", ""),
    "w_norm": ("norm", ""),
    "b_norm": ("norm", ""),
    "a1.weight": ("glora", ""),
    "a2.weight": ("glora", ""),
    "b1.weight": ("glora", ""),
    "b2.weight": ("glora", ""),
}
_PEFT_SUFFIXES = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_magnitude_vector": "dora",
    "lora_magnitude_vector.weight": "dora",
    # peft's LoHa/LoKr tensors carry LyCORIS' names (roles as in _KOHYA_SUFFIXES).
    **{k: role for k, (kind, role) in _KOHYA_SUFFIXES.items() if kind in ("loha", "lokr")},
}
# The adapter type a diffusers/PEFT tensor marks its module as (others leave it LoRA).
_PEFT_KINDS = {
    "lora_magnitude_vector": "dora",
    "lora_magnitude_vector.weight": "dora",
    **{k: kind for k, (kind, _) in _KOHYA_SUFFIXES.items() if kind in ("loha", "lokr")},
}
# Older diffusers files (attention processors): suffix → (role, what to cut from the path).
_LEGACY_SUFFIXES = {
    "_lora.down.weight": "down",
    "_lora.up.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
}

FORMAT_KOHYA = "kohya"
FORMAT_LYCORIS = "LyCORIS"
FORMAT_DIFFUSERS = "diffusers/PEFT"
FORMAT_LEGACY = "diffusers (legacy attention-processor keys)"


@dataclass
class Module:
    """One adapted module of a LoRA file.

    Attributes:
        name: The module's name in the file: the kohya name, or ``<component>.<path>``.
        component: ``unet`` (SD3: ``transformer``), ``text_encoder`` or ``text_encoder_2``.
        kind: ``lora``, ``dora`` (LoRA with a magnitude), ``loha``, ``lokr``, ``full``,
            ``norm`` or ``glora``.
        keys: The file's tensor keys of this module.
        rank: The adapter's rank, where it has one.
        alpha: Its alpha, where the file stores one (None: clients assume alpha = rank).
        in_features: Input width the adapter reads (from the down tensor).
        out_features: Output width it writes (from the up tensor).
    """

    name: str
    component: str
    kind: str = "lora"
    keys: list[str] = field(default_factory=list)
    rank: int | None = None
    alpha: float | None = None
    in_features: int | None = None
    out_features: int | None = None


@dataclass
class Parsed:
    """A LoRA file's format and modules, and the keys that belong to none."""

    format: str
    modules: dict[str, Module]
    stray_keys: list[str]

    @property
    def components(self) -> list[str]:
        """The model components the LoRA adapts, in a stable order."""
        return sorted({m.component for m in self.modules.values()})

    @property
    def adapter_type(self) -> str:
        """The modules' adapter type (``lora``, ``dora``, ``loha``, ``lokr``...), or the types
        joined with ``+`` when the file mixes them."""
        return "+".join(sorted({m.kind for m in self.modules.values()}))


def _split(key: str, suffixes: Mapping[str, object]) -> tuple[str, str] | None:
    for suffix in sorted(suffixes, key=len, reverse=True):
        if key.endswith("." + suffix) or (suffix.startswith(("_", ".")) and key.endswith(suffix)):
            cut = len(suffix) + (0 if suffix.startswith(("_", ".")) else 1)
            return key[:-cut], suffix
    return None


def _shapes(module: Module, role: str, shape: tuple[int, ...]) -> None:
    if role == "down" and len(shape) >= 2:
        module.rank, module.in_features = shape[0], shape[1]
    elif role == "up" and len(shape) >= 2:
        module.out_features = shape[0]


def _parse_kohya(header: Header) -> Parsed | None:
    modules: dict[str, Module] = {}
    stray = []
    for key, info in header.tensors.items():
        split = _split(key, _KOHYA_SUFFIXES)
        prefix = _KOHYA_NAME.match(key)
        if split is None or prefix is None:
            stray.append(key)
            continue
        name, suffix = split
        kind, role = _KOHYA_SUFFIXES[suffix]
        module = modules.setdefault(name, Module(name, KOHYA_COMPONENTS[prefix.group(1)]))
        module.keys.append(key)
        if kind and module.kind == "lora":  # a LoRA's dora_scale makes it DoRA, not back
            module.kind = kind
        _shapes(module, role, info.shape)
    if not modules:
        return None
    network = header.metadata.get("ss_network_module", "")
    lycoris = "lycoris" in network or any(m.kind != "lora" for m in modules.values())
    return Parsed(FORMAT_LYCORIS if lycoris else FORMAT_KOHYA, modules, stray)


def _parse_peft(header: Header) -> Parsed | None:
    modules: dict[str, Module] = {}
    stray = []
    legacy = False
    for key, info in header.tensors.items():
        split = _split(key, _PEFT_SUFFIXES)
        if split is not None:
            name, suffix = split
            role = _PEFT_SUFFIXES[suffix]
        elif (split := _split(key, _LEGACY_SUFFIXES)) is not None:
            legacy = True
            name, suffix = split
            role = _LEGACY_SUFFIXES[suffix]
            name = name.replace(".processor.", ".")
            name = name + ".0" if name.endswith(".to_out") else name
        else:
            stray.append(key)
            continue
        if name.startswith("base_model.model."):  # a bare PEFT save of a UNet
            name = "unet." + name[len("base_model.model.") :]
        component = name.split(".", 1)[0]
        if component not in PEFT_COMPONENTS:
            stray.append(key)
            continue
        module = modules.setdefault(name, Module(name, component))
        module.keys.append(key)
        module.kind = _PEFT_KINDS.get(suffix, module.kind)
        _shapes(module, role, info.shape)
    if not modules:
        return None
    _peft_alphas(modules, header.metadata)
    return Parsed(FORMAT_LEGACY if legacy else FORMAT_DIFFUSERS, modules, stray)


def _peft_alphas(modules: Mapping[str, Module], metadata: Mapping[str, str]) -> None:
    """Alphas from diffusers' ``lora_adapter_metadata`` (per component, with patterns)."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        return
    for module in modules.values():
        alpha = config.get(f"{module.component}.lora_alpha")
        if alpha is None:  # peft's LoHa and LoKr configs call it alpha
            alpha = config.get(f"{module.component}.alpha")
        path = module.name.split(".", 1)[1]
        for pattern, value in (config.get(f"{module.component}.alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{pattern}", path):
                alpha = value
        if alpha is not None:
            module.alpha = float(alpha)


def parse(header: Header, alphas: Mapping[str, float] | None = None) -> Parsed | None:
    """The file's format and modules, or None when it holds no LoRA tensors at all.

    Args:
        header: The file's checked header.
        alphas: The values of its kohya ``.alpha`` tensors (key → value), when loaded.
    """
    parsed = _parse_kohya(header) or _parse_peft(header)
    if parsed is None:
        return None
    for key, value in (alphas or {}).items():
        name = key[: -len(".alpha")]
        if name in parsed.modules:
            parsed.modules[name].alpha = float(value)
    return parsed


def alpha_keys(header: Header) -> list[str]:
    """The kohya ``.alpha`` tensors of a file (tiny scalars, worth loading to report them)."""
    return [k for k, info in header.tensors.items() if k.endswith(".alpha") and not info.shape]
