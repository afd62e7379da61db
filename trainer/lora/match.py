"""Match a LoRA file's modules against a base model: which keys would a client drop?

The model is a diffusers folder. Its UNet and text encoders are built from their configs on
the meta device (``accelerate.init_empty_weights``), so matching an SD-1.5 or SDXL model costs
no weight reads and little memory. Every Linear/Conv module gets the names a client may use
for it:

- kohya/LyCORIS: ``lora_unet_<path>`` with the diffusers path or the original (LDM) block
  path (ComfyUI ``comfy/lora.py`` and A1111 ``networks.py`` map both), SD3's transformer as
  ``lora_transformer_<path>`` (ComfyUI's SD3 rule), and the text encoder as
  ``lora_te_text_model_…`` (``lora_te1_``/``lora_te2_`` for two encoders; a one-encoder
  model also answers to ``lora_te1_``, which A1111 and ComfyUI accept there);
- diffusers/PEFT: ``<component>.<path>``.

Text-encoder paths are canonical (with ``text_model.``), whatever the installed transformers
calls them: that is the name every client matches, so a file without it is reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.lora import keys as lora_keys
from trainer.lora.files import LoraFileError
from trainer.lora.formats import FORMAT_KOHYA, FORMAT_LYCORIS, Parsed
from trainer.models.accessors import attribute

_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


def _build(folder: Path, component: str, library: str, class_name: str) -> torch.nn.Module:
    from accelerate import init_empty_weights

    module = __import__(library)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise LoraFileError(f"{folder / component}: unknown class {library}.{class_name}")
    with init_empty_weights():
        if library == "diffusers":
            return cls.from_config(cls.load_config(folder / component))
        return cls(cls.config_class.from_pretrained(folder / component))


def model_components(folder: str | Path) -> dict[str, torch.nn.Module]:
    """The UNet (SD3: transformer) and text encoders of a diffusers folder, built empty on the
    meta device (SD3's T5 is never adapted, so it is not built).

    Raises:
        LoraFileError: when ``folder`` is not a diffusers model folder.
    """
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise LoraFileError(
            f"--against {folder}: not a diffusers model folder (no model_index.json); pass "
            "the folder of a diffusers pipeline such as stable-diffusion-v1-5"
        )
    index = json.loads(index_file.read_text())
    models = {}
    for component in _COMPONENTS:
        entry = index.get(component)
        if isinstance(entry, list) and len(entry) == 2 and entry[0]:
            models[component] = _build(folder, component, entry[0], entry[1])
    if not set(lora_keys.DENOISERS) & set(models):
        raise LoraFileError(f"--against {folder}: the model has no UNet to match against")
    return models


def _weighted(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Module path → (input width, output width) of every Linear/Conv-like module."""
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            found[name] = (int(weight.shape[1]), int(weight.shape[0]))
    return found


def client_names(models: dict[str, torch.nn.Module], kohya: bool) -> dict[str, tuple[int, int]]:
    """Every name a client accepts for a module of the model → its (in, out) widths."""
    texts = [c for c in models if lora_keys.is_text_component(c)]
    names: dict[str, tuple[int, int]] = {}
    unet_config = dict(attribute(models["unet"], "config", dict)) if "unet" in models else {}
    layers = unet_config.get("layers_per_block", 2)
    layers = layers if isinstance(layers, int) else layers[0]
    with_attention = {
        i for i, kind in enumerate(unet_config.get("up_block_types", ())) if "CrossAttn" in kind
    }
    for component, model in models.items():
        for path, widths in _weighted(model).items():
            if component == lora_keys.TRANSFORMER:
                key = f"{lora_keys.KOHYA_TRANSFORMER}_{path.replace('.', '_')}"
                names[key if kohya else f"{component}.{path}"] = widths
                continue
            if component == "unet":
                if not kohya:
                    names[f"unet.{path}"] = widths
                    continue
                names["lora_unet_" + path.replace(".", "_")] = widths
                ldm = lora_keys.ldm_unet_path(path, layers, with_attention)
                if ldm is not None:
                    names["lora_unet_" + ldm.replace(".", "_")] = widths
                continue
            canonical = lora_keys.canonical_text_path(path)
            if not kohya:
                names[f"{component}.{canonical}"] = widths
                continue
            prefixes: tuple[str, ...]
            if len(texts) == 1:
                prefixes = ("lora_te", "lora_te1")
            else:
                prefixes = (f"lora_te{texts.index(component) + 1}",)
            for prefix in prefixes:
                names[f"{prefix}_{canonical.replace('.', '_')}"] = widths
    return names


def match_against(parsed: Parsed, folder: str | Path) -> tuple[list[str], list[str]]:
    """Keys of the file that name no module of the model, and keys of wrong-shaped modules.

    Args:
        parsed: The LoRA file's modules.
        folder: A diffusers model folder.
    """
    models = model_components(folder)
    names = client_names(models, kohya=parsed.format in (FORMAT_KOHYA, FORMAT_LYCORIS))
    unmatched, wrong_shape = [], []
    for module in parsed.modules.values():
        widths = names.get(module.name)
        if widths is None:
            unmatched += module.keys
            continue
        known = module.in_features is not None and module.out_features is not None
        # Kinds whose down/up tensors hold the layer's widths (LoKr's hold factors of them).
        sized = module.kind in ("lora", "dora", "loha") and known
        if sized and (module.in_features, module.out_features) != widths:
            wrong_shape += module.keys
    return sorted(unmatched), sorted(wrong_shape)
