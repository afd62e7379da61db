"""Can ``model.pretrained`` and ``model.vae`` be loaded? Found in seconds, without reading
weights or importing diffusers, so preflight reports a wrong path before the model libraries
load (they take seconds to import, and the weights minutes to read).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from trainer.config.load import ModelConfig


def is_single_file(source: str) -> bool:
    """A one-file checkpoint (by its extension), not a diffusers folder or a hub id."""
    return source.endswith((".safetensors", ".ckpt", ".pt", ".bin"))


# A hub id is "owner/name" (or a bare "name" of a legacy repo): no leading dot, slash or tilde.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# The files a diffusers SD folder must hold, whatever its weights format (SDXL also holds
# text_encoder_2/; trainer/models/family.py checks that once it knows the family). SD3 holds
# its denoiser in transformer/ instead of unet/.
FOLDER_CONFIGS = ("unet/config.json", "vae/config.json", "text_encoder/config.json")
SD3_DENOISER = "transformer/config.json"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def source_problems(config: ModelConfig, hub_timeout: float = 10.0) -> list[str]:
    """Why ``model.pretrained`` cannot be loaded, found in seconds without reading weights.

    A local path that does not exist is called a missing path; a folder that is not a
    diffusers model says which file it lacks; a hub id is looked up in the local cache, and
    online with one short request (a typo'd id would otherwise be retried for minutes).
    """
    source = config.pretrained
    key = f"model.pretrained = {source!r}"
    path = Path(source).expanduser()
    if is_single_file(source):
        if path.suffix != ".safetensors":
            return [
                f"{key}: only .safetensors checkpoints are loaded (a .ckpt/.pt/.bin file can "
                "run pickled code); convert it first"
            ]
        return [] if path.is_file() else [f"{key}: no such file ({path.resolve()})"]
    if path.is_dir():
        missing = [name for name in FOLDER_CONFIGS if not (path / name).is_file()]
        if (path / SD3_DENOISER).is_file() and FOLDER_CONFIGS[0] in missing:
            missing.remove(FOLDER_CONFIGS[0])
        if missing:
            return [
                f"{key}: the folder is not a diffusers Stable Diffusion model (no "
                f"{', '.join(missing)}); point it at a folder with model_index.json, unet/ "
                "(SD3: transformer/), vae/, text_encoder/ and tokenizer/, or at a .safetensors "
                "checkpoint"
            ]
        return []
    if path.exists():
        return [f"{key}: not a folder or a .safetensors file"]
    if not _HUB_ID.match(source) or source.count("/") > 1:
        return [f"{key}: no such folder ({path.resolve()})"]
    return _hub_problems(config, key, path, hub_timeout)


def vae_problems(config: ModelConfig) -> list[str]:
    """Why ``model.vae`` cannot be loaded, found without reading weights (empty: fine)."""
    source = config.vae
    if not source:
        return []
    key = f"model.vae = {source!r}"
    path = Path(source).expanduser()
    if is_single_file(source):
        # Loading one means diffusers' conversion from the original layout, which no offline
        # test can cover (no original-layout VAE can be made here): refused, not guessed.
        return [
            f"{key}: a single-file VAE is not supported; give a diffusers VAE folder (with "
            "config.json) or a hub id such as madebyollin/sdxl-vae-fp16-fix"
        ]
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "vae" / "config.json").is_file():
            return []
        return [
            f"{key}: the folder holds no VAE (no config.json, nor vae/config.json); point it "
            "at a diffusers AutoencoderKL folder, a model folder with vae/, or a .safetensors"
        ]
    if path.exists() or not _HUB_ID.match(source) or source.count("/") > 1:
        return [f"{key}: no such folder ({path.resolve()})"]
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(source, "config.json"), str):
        return []
    if _offline():
        return [
            f"{key}: not a local folder, and as a hub id it is not in the local cache while "
            "offline (HF_HUB_OFFLINE=1); download it once with network access"
        ]
    return []  # an online hub id is looked up by the load itself


def _hub_problems(config: ModelConfig, key: str, path: Path, timeout: float) -> list[str]:
    import huggingface_hub
    from huggingface_hub.utils import RepositoryNotFoundError

    source, revision = config.pretrained, config.revision or None
    cached = huggingface_hub.try_to_load_from_cache(source, "model_index.json", revision=revision)
    if isinstance(cached, str):
        return []
    local = f"no such folder ({path.resolve()})"
    if _offline():
        return [
            f"{key}: {local}, and as a hub id it is not in the local cache while offline "
            "(HF_HUB_OFFLINE=1); fix the path, or download the model once with network access"
        ]
    try:
        huggingface_hub.model_info(source, revision=revision, timeout=timeout)
    except RepositoryNotFoundError:
        return [
            f"{key}: {local}, and no model of that id exists on the hub (or it is private or "
            "gated: log in with `hf auth login`)"
        ]
    except Exception as err:
        # What a failed lookup raises depends on huggingface_hub's HTTP client (httpx's
        # ConnectError, not an OSError, in 2.x; requests' in 0.x): any failure of this probe
        # means the id could not be checked, which is the user's problem to hear, not a
        # traceback.
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return [
            f"{key}: {local}, and the hub could not be reached to look it up ({first}); "
            "check the network, or set HF_HUB_OFFLINE=1 to use only the local cache"
        ]
    return []
