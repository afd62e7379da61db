"""Key names of both LoRA files against the clients' own rules, under transformers 4 and 5.

The SD-1.5 and SDXL models are built from their published configs on the meta device, so the
names are the real ones at no memory cost. The expected names come from ``client_rules``,
which restates each client's rule without importing the trainer.
"""

from __future__ import annotations

import client_rules as rules
import pytest
import torch

from trainer.lora import keys as lora_keys
from trainer.models import architectures

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
SD1 = architectures.get("sd1")
SDXL = architectures.get("sdxl")


@pytest.fixture(scope="module")
def sd15():
    return rules.sd15_models()


def adapter_state(model, component, targets, rank=4) -> dict[str, torch.Tensor]:
    """Diffusers-format LoRA tensors on every Linear whose path ends in a target, keyed by the
    paths the model itself reports (what peft's state dict holds)."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(tuple("." + t for t in targets)):
            state[f"{component}.{name}.lora_A.weight"] = torch.empty(
                rank, module.in_features, device="meta"
            )
            state[f"{component}.{name}.lora_B.weight"] = torch.empty(
                module.out_features, rank, device="meta"
            )
    return state


def ends_with_target(name: str, targets) -> bool:
    return name.endswith(tuple("_" + t.replace(".", "_") for t in targets))


@pytest.mark.parametrize("layout", [rules.as_transformers4, rules.as_transformers5])
def test_diffusers_text_encoder_keys_are_canonical_under_both_transformers(sd15, layout):
    _, text = sd15
    state = lora_keys.canonical_state(adapter_state(layout(text), "text_encoder", TEXT_TARGETS))
    # ComfyUI maps diffusers text-encoder keys spelled exactly so (comfy/lora.py).
    expected = {
        f"text_encoder.text_model.encoder.layers.{i}.self_attn.{p}.{ab}.weight"
        for i in range(12)
        for p in TEXT_TARGETS
        for ab in ("lora_A", "lora_B")
    }
    assert set(state) == expected


@pytest.mark.parametrize("layout", [rules.as_transformers4, rules.as_transformers5])
def test_kohya_names_are_exactly_kohyas_rule_under_both_transformers(sd15, layout):
    unet, text = sd15
    state = adapter_state(unet, "unet", UNET_TARGETS)
    state |= adapter_state(layout(text), "text_encoder", TEXT_TARGETS)
    kohya = lora_keys.to_kohya(state, SD1, {"unet": 8.0, "text_encoder": 8.0})
    modules = {rules.module_name(k) for k in kohya}
    every = rules.kohya_names(unet, [rules.as_transformers4(text)])
    expected = {n for n in every if ends_with_target(n, UNET_TARGETS + TEXT_TARGETS)}
    assert modules == expected
    assert len(expected) == 16 * 8 + 12 * 4  # 16 transformer blocks × 8, 12 CLIP layers × 4
    for module in modules:
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= set(
            kohya
        )
    assert any(m.startswith("lora_te_text_model_encoder_layers_11_") for m in modules)


def test_every_kohya_key_maps_to_a_module_of_sd15_under_every_client_rule(sd15):
    """Zero unmatched keys for kohya, ComfyUI and A1111, on SD-1.5's real module tree."""
    unet, text = sd15
    state = adapter_state(unet, "unet", UNET_TARGETS)
    state |= adapter_state(rules.as_transformers5(text), "text_encoder", TEXT_TARGETS)
    kohya = lora_keys.to_kohya(state, SD1, {"unet": 4.0, "text_encoder": 4.0})
    modules = {rules.module_name(k) for k in kohya}
    kohya_rule = rules.kohya_names(unet, [rules.as_transformers4(text)])
    assert sorted(modules - kohya_rule) == []
    assert sorted(modules - rules.comfy_sd1_names(unet, 12)) == []
    compvis = rules.sd15_compvis_attention_names()
    assert sorted(m for m in modules if rules.a1111_compvis(m) not in compvis) == []


def test_other_targets_also_map_under_kohya_and_comfyui(sd15):
    """Projections, feed-forwards, resnet convs and the CLIP MLP, not only attention."""
    unet, text = sd15
    unet_targets = ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "time_emb_proj")
    state = adapter_state(unet, "unet", unet_targets)
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Conv2d) and name.endswith((".conv1", ".conv2")):
            state[f"unet.{name}.lora_A.weight"] = torch.empty(4, module.in_channels, 3, 3)
            state[f"unet.{name}.lora_B.weight"] = torch.empty(module.out_channels, 4, 1, 1)
    state |= adapter_state(rules.as_transformers5(text), "text_encoder", ("fc1", "fc2"))
    modules = {
        rules.module_name(k)
        for k in lora_keys.to_kohya(state, SD1, {"unet": 1.0, "text_encoder": 1.0})
    }
    assert len(modules) > 100
    assert sorted(modules - rules.kohya_names(unet, [rules.as_transformers4(text)])) == []
    assert sorted(modules - rules.comfy_sd1_names(unet, 12)) == []


def test_sdxl_uses_te1_te2_and_the_original_unet_layout():
    """The SDXL plug-in point: kohya's SDXL UNet names its blocks as the original checkpoint."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = rules.sdxl_unet()
    with init_empty_weights():
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, num_hidden_layers=12))
        clip_g = CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20)
        )
    state = adapter_state(unet, "unet", UNET_TARGETS)
    state |= adapter_state(clip_l, "text_encoder", TEXT_TARGETS)
    state |= adapter_state(clip_g, "text_encoder_2", TEXT_TARGETS)
    alphas = {"unet": 1.0, "text_encoder": 1.0, "text_encoder_2": 1.0}
    modules = {rules.module_name(k) for k in lora_keys.to_kohya(state, SDXL, alphas)}
    unet_names = {m for m in modules if m.startswith("lora_unet_")}
    assert unet_names == rules.sdxl_kohya_attention_names()
    text_rule = rules.kohya_names(
        torch.nn.Module(), [rules.as_transformers4(clip_l), rules.as_transformers4(clip_g)]
    )
    assert modules - unet_names == {n for n in text_rule if ends_with_target(n, TEXT_TARGETS)}
    assert architectures.detect(dict(unet.config)).name == "sdxl"


# The same modules as ComfyUI's unet_to_diffusers and A1111's tables place them (SDXL base).
@pytest.mark.parametrize(
    ("diffusers_path", "original_path"),
    [
        ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
        ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
        ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
        ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
        (
            "mid_block.attentions.0.transformer_blocks.9.ff.net.2",
            "middle_block.1.transformer_blocks.9.ff.net.2",
        ),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
        ("up_blocks.1.attentions.2.proj_out", "output_blocks.5.1.proj_out"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("conv_in", "input_blocks.0.0"),
    ],
)
def test_original_unet_layout(diffusers_path, original_path):
    assert lora_keys.ldm_unet_path(diffusers_path) == original_path


def test_text_paths_round_trip_between_layouts():
    flat = "encoder.layers.3.self_attn.q_proj"
    canonical = lora_keys.canonical_text_path(flat)
    assert canonical == "text_model." + flat
    assert lora_keys.canonical_text_path(canonical) == canonical
    assert lora_keys.live_text_path(canonical, has_text_model=False) == flat
    assert lora_keys.live_text_path(canonical, has_text_model=True) == canonical
    assert lora_keys.canonical_text_path("text_projection") == "text_projection"


@pytest.mark.parametrize(
    ("config", "name"),
    [
        ({"cross_attention_dim": 768}, "sd1"),
        ({"cross_attention_dim": 1024}, "sd2"),
        ({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, "sdxl"),
        ({"cross_attention_dim": 32}, "sd1"),
    ],
)
def test_architecture_detection(config, name):
    assert architectures.detect(config).name == name


# kohya library/model_util.py, sdxl_model_util.py and sai_model_spec.py.
@pytest.mark.parametrize(
    ("name", "prediction", "version", "spec"),
    [
        ("sd1", "epsilon", "sd_v1", "stable-diffusion-v1/lora"),
        ("sd2", "epsilon", "sd_v2", "stable-diffusion-v2-512/lora"),
        ("sd2", "v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v/lora"),
        ("sdxl", "epsilon", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    ],
)
def test_version_strings_are_kohyas(name, prediction, version, spec):
    arch = architectures.get(name)
    assert arch.version_string(prediction) == version
    assert arch.modelspec_architecture(prediction) == spec


def test_unknown_architecture_and_component_are_clear_errors():
    with pytest.raises(ValueError, match="sd1, sd2, sdxl, sd3"):
        architectures.get("flux")
    with pytest.raises(ValueError, match="text_encoder_2"):
        lora_keys.kohya_name("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1", SD1)


def typed_state(model, component, targets, adapter, rank=4) -> dict[str, torch.Tensor]:
    """Diffusers-format tensors of one adapter type on every targeted Linear, shaped as peft
    shapes them (meta tensors: only names and shapes matter here)."""
    state = {}
    for key, value in adapter_state(model, component, targets, rank).items():
        path = key[: -len(".lora_A.weight")]
        out_features, in_features = (
            (value.shape[0], None) if key.endswith("lora_B.weight") else (None, value.shape[1])
        )
        if adapter in ("lora", "dora"):
            state[key] = value
            if adapter == "dora" and in_features is not None:
                state[f"{path}.lora_magnitude_vector"] = torch.empty(1, in_features, device="meta")
        elif adapter == "loha" and out_features is not None:
            width = value.shape[0]
            fan_in = adapter_state_in(model, component, path)
            for i in (1, 2):
                state[f"{path}.hada_w{i}_a"] = torch.empty(width, rank, device="meta")
                state[f"{path}.hada_w{i}_b"] = torch.empty(rank, fan_in, device="meta")
        elif adapter == "lokr" and out_features is not None:
            fan_in = adapter_state_in(model, component, path)
            state[f"{path}.lokr_w1"] = torch.empty(4, 4, device="meta")
            state[f"{path}.lokr_w2_a"] = torch.empty(value.shape[0] // 4, rank, device="meta")
            state[f"{path}.lokr_w2_b"] = torch.empty(rank, fan_in // 4, device="meta")
    return state


def adapter_state_in(model, component, path) -> int:
    module = model.get_submodule(path[len(component) + 1 :])
    return module.in_features


@pytest.mark.parametrize("adapter", ["lora", "dora", "loha", "lokr"])
def test_every_type_has_client_names_and_exactly_the_parts_clients_read(sd15, adapter):
    """Zero unmatched modules under kohya's, ComfyUI's and A1111's rules, and per module the
    tensor parts that type's client loader reads, plus alpha, and nothing else."""
    unet, text = sd15
    state = typed_state(unet, "unet", UNET_TARGETS, adapter)
    state |= typed_state(rules.as_transformers5(text), "text_encoder", TEXT_TARGETS, adapter)
    kohya = lora_keys.to_kohya(state, SD1, {"unet": 4.0, "text_encoder": 4.0})
    parts = rules.module_parts(kohya)
    modules = set(parts)
    assert len(modules) == 16 * 8 + 12 * 4
    assert sorted(modules - rules.kohya_names(unet, [rules.as_transformers4(text)])) == []
    assert sorted(modules - rules.comfy_sd1_names(unet, 12)) == []
    compvis = rules.sd15_compvis_attention_names()
    assert sorted(m for m in modules if rules.a1111_compvis(m) not in compvis) == []
    allowed = [p | {"alpha"} for p in rules.MODULE_PARTS[adapter]]
    assert all(found in allowed for found in parts.values()), {frozenset(p) for p in parts.values()}
    if adapter == "dora":  # dora_scale: one magnitude per input column, as (1, in)
        to_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
        assert tuple(kohya[f"{to_k}.dora_scale"].shape) == (1, 768)
