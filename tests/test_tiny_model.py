"""The generated tiny model is a real SD-1.x diffusers folder with SD's proportions."""

import torch
from diffusers import StableDiffusionPipeline


def test_round_trips_through_from_pretrained_offline(tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    # SD proportions the trainer's code paths depend on.
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    assert pipe.vae.config.latent_channels == 4
    assert pipe.vae.config.scaling_factor == 0.18215
    assert pipe.tokenizer.model_max_length == 77
    assert any("CrossAttn" in t for t in pipe.unet.config.down_block_types)
    ids = pipe.tokenizer("a red circle", padding="max_length", return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3)
    latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)


def test_tokenizer_folder_has_the_classic_files(tiny_model):
    names = {p.name for p in (tiny_model / "tokenizer").iterdir()}
    assert {"vocab.json", "merges.txt", "special_tokens_map.json"} <= names


def test_same_seed_gives_identical_weights(tmp_path):
    from make_tiny_sd import make_tiny_sd
    from safetensors.torch import load_file

    a = make_tiny_sd(tmp_path / "a", seed=3)
    b = make_tiny_sd(tmp_path / "b", seed=3)
    wa = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
