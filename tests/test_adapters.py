"""Every adapter type (LoRA, DoRA, LoHa, LoKr): it trains, resumes bitwise, and its exported
kohya/LyCORIS file, applied by the clients' documented formulas (``adapter_rules``, written
in this test suite, not the trainer), gives the layers our trained model computes.

The exported files are written by ``trainer/run/final.py`` from a checkpoint, with no model
loaded, as at the end of a run. The adapters are made clearly non-zero first: a few updates
leave LoHa's and LoKr's zero-initialised factors almost zero, and a formula that dropped
them would still pass.
"""

from __future__ import annotations

import json
import shutil

import adapter_rules
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.commands import inspect as inspect_lora
from trainer.config.load import ConfigError
from trainer.lora import adapters as lora
from trainer.lora import keys as lora_keys
from trainer.lora.files import WEIGHTS_NAME
from trainer.run import checkpoint as ckpt
from trainer.run import final, loop

TEXT = "text_encoder"
TE_ON = "lora.train_text_encoder=true"
# Each type with the keys that exercise its own randomness (dropouts draw from the seeded
# per-micro-batch RNG, so resume must replay them exactly).
TYPES = {
    "lora": ("lora.dropout=0.1",),
    "dora": ("lora.dropout=0.1",),
    # conv_tucker: the 3×3 conv1 layers get Tucker cores (hada_t1/_t2, lokr_t2)
    "loha": ("lora.rank_dropout=0.2", "lora.module_dropout=0.2", "lora.conv_tucker=true"),
    # rank 2 < 8/2: the larger Kronecker factor is a low-rank pair (lokr_w2_a/_b)
    "lokr": ("lora.rank=2", "lora.rank_dropout=0.2", "lora.conv_tucker=true"),
    "lokr_full": ("lora.rank=4",),  # both factors full: the clients apply them unscaled
}
RUN = (
    "train.max_steps=3",
    "train.batch_size=2",
    "train.gradient_accumulation_steps=1",
    "checkpoint.every_n_steps=2",
    "lora.train_text_encoder=true",
    "lora.alpha=8.0",
    'output.save_dtype="fp32"',
    'output.name="adapter"',
    # Conv layers too: resnet convolutions take LoHa/LoKr (and DoRA) through the same path.
    'lora.target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"]',
)


def overrides(kind: str) -> list[str]:
    adapter = "lokr" if kind.startswith("lokr") else kind
    return [f'lora.type="{adapter}"', *RUN, *TYPES[kind]]


@pytest.fixture(scope="module", params=list(TYPES))
def trained(request, tiny_config, tmp_path_factory):
    """(kind, config, result) of an uninterrupted run with checkpoints at 2 and 3."""
    out = tmp_path_factory.mktemp(f"adapter-{request.param}")
    cfg = tiny_config(out, *overrides(request.param))
    return request.param, cfg, loop.run(cfg)


def test_each_type_resumes_bitwise(trained, make_config, tmp_path):
    kind, _, result = trained
    start = ckpt.step_dir(result.output_dir, 2)
    cfg = make_config(*overrides(kind), f'checkpoint.resume="{start}"', output=tmp_path / "r")
    loop.run(cfg)
    ours, theirs = (
        load_file(tmp_path / "r" / WEIGHTS_NAME),
        load_file(result.output_dir / WEIGHTS_NAME),
    )
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), kind


def test_each_type_trains_its_own_tensors(trained):
    kind, _, result = trained
    state = load_file(result.output_dir / WEIGHTS_NAME)
    adapter = "lokr" if kind.startswith("lokr") else kind
    assert lora_keys.adapter_type(state) == adapter
    first = load_file(ckpt.step_dir(result.output_dir, 2) / WEIGHTS_NAME)
    moved = [k for k in state if not torch.equal(state[k], first[k])]
    assert moved, f"{kind}: no adapter tensor changed between update 2 and 3"


def perturbed_checkpoint(result, tmp_path):
    """The run's last checkpoint with every adapter tensor clearly non-zero (see the module
    doc); returns the folder and the models holding the same adapters."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (result.unet, result.text_encoder):
            for name, param in model.named_parameters() if model is not None else ():
                if param.requires_grad:
                    noise = torch.randn(param.shape, generator=generator)
                    if "magnitude" in name:  # keep magnitudes positive, near the norms
                        param.mul_(1 + 0.3 * noise.tanh())
                    else:
                        param.add_(0.2 * noise)
    folder = tmp_path / "step-000003"
    shutil.copytree(ckpt.step_dir(result.output_dir, 3), folder)
    lora.save(folder, result.unet, result.text_encoder)
    return folder


@pytest.fixture
def exported(trained, tmp_path):
    """The final files written by final.py from a (perturbed) checkpoint, no model loaded."""
    kind, cfg, result = trained
    folder = perturbed_checkpoint(result, tmp_path)
    out = tmp_path / "final"
    written = final.write_outputs(folder, out, cfg, {"num_processes": 1})
    return kind, result, {p.name: p for p in written}


def adapted_layers(model, component):
    """(kohya module name, peft layer) for every adapted layer of a model."""
    from trainer.models import architectures

    layers = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_base_layer") and name:
            path = lora_keys.canonical_text_path(name) if component == TEXT else name
            kohya = lora_keys.kohya_name(component, path, architectures.get("sd1"))
            layers[kohya] = module
    return layers


def test_exported_file_gives_the_trained_layers_by_the_clients_formulas(exported):
    """Each module of the kohya file, merged as A1111/ComfyUI merge it, computes what the
    trained layer computes, for the UNet (linear and conv) and the text encoder."""
    _, result, files = exported
    tensors = load_file(files["adapter.safetensors"])
    modules = adapter_rules.group_modules(tensors)
    checked = 0
    generator = torch.Generator().manual_seed(1)
    for component, model in (("unet", result.unet), (TEXT, result.text_encoder)):
        model.eval()
        for name, layer in adapted_layers(model, component).items():
            base = layer.get_base_layer()
            merged = adapter_rules.merged_weight(modules.pop(name), base.weight.detach())
            if isinstance(base, torch.nn.Conv2d):
                x = torch.randn(2, base.in_channels, 6, 6, generator=generator)
                expected = torch.nn.functional.conv2d(
                    x, merged, base.bias, base.stride, base.padding, base.dilation, base.groups
                )
            else:
                x = torch.randn(3, base.in_features, generator=generator)
                expected = torch.nn.functional.linear(x, merged, base.bias)
            with torch.no_grad():
                ours = layer(x)
                assert (ours - base(x)).abs().max() > 1e-2, f"{name}: adapter is a no-op"
            torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5, msg=name)
            checked += 1
    assert modules == {}, f"modules no layer matched: {sorted(modules)[:3]}"
    assert checked > 40


def test_exported_metadata_names_the_network(exported):
    kind, _, files = exported
    with safe_open(str(files["adapter.safetensors"]), framework="pt") as f:
        header = f.metadata()
    if kind == "lora":
        assert header["ss_network_module"] == "networks.lora"
        assert "ss_network_args" not in header
        return
    assert header["ss_network_module"] == "lycoris.kohya"
    args = json.loads(header["ss_network_args"])
    adapter = "lokr" if kind.startswith("lokr") else kind
    assert args["algo"] == {"dora": "lora"}.get(adapter, adapter)
    if adapter == "dora":
        assert args["dora_wd"] == "True" and args["wd_on_output"] == "False"
    if adapter == "lokr":
        assert args["factor"] == "-1"


def test_inspect_reports_the_type_of_both_files(exported):
    kind, _, files = exported
    adapter = "lokr" if kind.startswith("lokr") else kind
    kohya = inspect_lora.inspect(files["adapter.safetensors"])
    assert kohya.adapter_type == adapter
    assert kohya.format == ("kohya" if adapter == "lora" else "LyCORIS")
    assert f"adapter type:  {adapter}" in inspect_lora.format_report(kohya)
    assert inspect_lora.inspect(files[WEIGHTS_NAME]).adapter_type == adapter


# ---------------------------------------------------------------- DoRA in diffusers


@pytest.fixture(scope="module")
def dora_runs(tiny_config, tmp_path_factory):
    """Two DoRA runs: per-output (UNet only, diffusers file) and per-input."""
    runs = {}
    for axis, fmt, te in (("output", "diffusers", "false"), ("input", "both", "true")):
        out = tmp_path_factory.mktemp(f"dora-{axis}")
        sets = ("lora.type=dora", f"lora.dora_axis={axis}", f"output.format={fmt}")
        cfg = tiny_config(out, *sets, *RUN[:2], f"lora.train_text_encoder={te}")
        runs[axis] = loop.run(cfg)
    return runs


def test_per_output_dora_loads_in_diffusers_with_the_trained_outputs(dora_runs, tiny_model):
    from diffusers import StableDiffusionPipeline

    result = dora_runs["output"]
    folder = perturbed_checkpoint(result, result.output_dir / "perturbed")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_lora_weights(str(folder), weight_name=WEIGHTS_NAME)
    ids = pipe.tokenizer("a red circle", padding="max_length", return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        theirs = pipe.unet(latents, 10, encoder_hidden_states=hidden).sample
        pipe.disable_lora()
        base = pipe.unet(latents, 10, encoder_hidden_states=hidden).sample
        ours = result.unet.eval()(latents, 10, encoder_hidden_states=hidden).sample
    assert (theirs - base).abs().max() > 1e-3  # the adapters loaded and do something
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_diffusers_refuses_per_input_dora_loudly(dora_runs, tiny_model):
    """Its magnitudes are shaped (1, in) like dora_scale, so diffusers' per-output DoRA
    cannot take them by mistake, not even for a square layer."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    with pytest.raises(RuntimeError, match="size mismatch"):
        pipe.load_lora_weights(str(dora_runs["input"].output_dir), weight_name=WEIGHTS_NAME)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_set_lora_type_validates(make_config, kind):
    assert make_config(f"lora.type={kind}").lora.type == kind  # a bare word is a string


def test_a_whole_lora_table_replacement_validates(make_config):
    cfg = make_config('lora={type = "lokr", rank = 8, factor = 4, decompose_both = true}')
    assert (cfg.lora.type, cfg.lora.factor, cfg.lora.decompose_both) == ("lokr", 4, True)
    assert cfg.lora.target_modules == ("to_q", "to_k", "to_v", "to_out.0")  # defaults


def test_keys_of_another_type_are_errors_naming_the_type(make_config):
    with pytest.raises(ConfigError) as err:
        make_config(
            "lora.type=loha",
            "lora.factor=4",
            "lora.dropout=0.1",
            "lora.dora_axis=output",
            "lora.rank_dropout=1.5",
        )
    problems = "\n".join(err.value.problems)
    assert "lora.factor: applies only to lora.type = 'lokr', not 'loha'" in problems
    assert "lora.dropout: applies only to lora.type = 'lora' or 'dora'" in problems
    assert "lora.dora_axis: applies only to lora.type = 'dora'" in problems
    assert "lora.rank_dropout: 1.5 must be in [0, 1)" in problems
    with pytest.raises(ConfigError, match="not one of"):
        make_config("lora.type=locon")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("lora.type=dora", "lora.dora_axis=output"), "cannot be written in the kohya format"),
        (("lora.type=dora", "output.format=diffusers"), "diffusers applies DoRA per output row"),
        (
            ("lora.type=dora", "lora.dora_axis=output", "output.format=diffusers", TE_ON),
            "loads DoRA magnitudes into the UNet only",
        ),
        (("lora.type=loha", "output.format=diffusers"), "reads only LoRA and DoRA"),
        (("lora.type=lokr", "output.format=diffusers"), "reads only LoRA and DoRA"),
    ],
)
def test_types_are_written_only_where_a_client_applies_them(make_config, sets, message):
    with pytest.raises(ConfigError, match=message):
        make_config(*sets)


def test_per_output_dora_has_no_kohya_form():
    state = {
        "unet.a.lora_A.weight": torch.zeros(2, 3),
        "unet.a.lora_B.weight": torch.zeros(4, 2),
        "unet.a.lora_magnitude_vector": torch.ones(4),
    }
    from trainer.models import architectures

    with pytest.raises(ValueError, match="per-output DoRA magnitude"):
        lora_keys.to_kohya(state, architectures.get("sd1"), {"unet": 1.0})


def test_lora_type_is_a_sweep_grid_entry(tiny_model, tiny_data, tmp_path):
    """A grid over lora.type and over whole [lora] tables expands into valid run configs."""
    from sweep_helpers import write_sweep

    from trainer.sweep import expand, spec

    base = write_sweep(tmp_path / "files", tiny_model, tiny_data).parent / "base.toml"
    path = tmp_path / "adapters.toml"
    path.write_text(
        f'base = "{base}"\n[grid]\n'
        'lora = [{ type = "lora" }, { type = "lokr", factor = 4, decompose_both = true }]\n'
        '"lora.rank" = [4, 8]\n'
    )
    s = spec.load(path, str(tmp_path / "out"))
    runs = expand.build_runs(s, s.points)
    kinds = sorted((r.config.lora.type, r.config.lora.factor, r.config.lora.rank) for r in runs)
    assert kinds == [("lokr", 4, 4), ("lokr", 4, 8), ("lora", -1, 4), ("lora", -1, 8)]


def test_exporting_per_output_dora_as_kohya_is_one_clear_error(dora_runs, capsys):
    from trainer.commands import cli

    folder = dora_runs["output"].output_dir
    assert cli.main(["export", str(folder), "--format", "kohya", "--out", str(folder / "k")]) == 2
    err = capsys.readouterr().err
    assert "per-output DoRA magnitude" in err and "--format diffusers" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- sdlora sample


def test_sdlora_sample_loads_every_type_as_trained(exported, tiny_model, tmp_path, capsys):
    """The pipeline `sdlora sample` draws with predicts what the trained models predict, for
    every type (diffusers loads plain LoRA; peft, as in training, the others); scale 0 of a
    LoHa/LoKr is the base model. Our kohya file of a non-LoRA type is refused in one line."""
    from diffusers import StableDiffusionPipeline

    from trainer.commands import cli, sample

    kind, result, files = exported
    path = files[WEIGHTS_NAME]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    ids = pipe.tokenizer("a red circle", padding="max_length", return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def predict(unet, encoder) -> torch.Tensor:
        with torch.no_grad():
            hidden = encoder.eval()(ids)[0]
            return unet.eval()(latents, 10, encoder_hidden_states=hidden).sample

    base = predict(pipe.unet, pipe.text_encoder)
    set_scale = sample.apply_lora(pipe, sample.check_lora(path))
    set_scale(1.0)
    theirs = predict(pipe.unet, pipe.text_encoder)
    ours = predict(result.unet, result.text_encoder)
    assert (theirs - base).abs().max() > 1e-3, "the adapters loaded and do something"
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    if kind != "lora":
        set_scale(0.0)
        if kind != "dora":  # DoRA's magnitudes renormalise the base weight at any scale
            torch.testing.assert_close(predict(pipe.unet, pipe.text_encoder), base)
        set_scale(1.0)  # back from 0: the scaling is restored, not multiplied away
        torch.testing.assert_close(
            predict(pipe.unet, pipe.text_encoder), ours, rtol=1e-4, atol=1e-5
        )
        kohya = next(p for name, p in files.items() if name != WEIGHTS_NAME)
        argv = ["sample", "--lora", str(kohya), "--model", str(tiny_model), "--prompt", "a"]
        capsys.readouterr()  # the progress bars of the pipeline loaded above
        assert cli.main([*argv, "--out", str(tmp_path / "k.png")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and WEIGHTS_NAME in err and "Traceback" not in err
