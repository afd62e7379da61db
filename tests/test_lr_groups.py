"""LoRA+ and per-block LR multipliers: the groups, which tensor trains in which, the applied LR.

The block a module sits in is checked against kohya's own rule (``networks/lora.py``
``get_block_index``), applied to kohya's module names as kohya's files spell them, not to the
diffusers paths ``trainer/lora/blocks.py`` reads.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import load as config
from trainer.lora import blocks
from trainer.lora.files import WEIGHTS_NAME
from trainer.lora.keys import kohya_name
from trainer.models.architectures import get as get_architecture
from trainer.report.tracking import read_metrics
from trainer.run import checkpoint as ckpt
from trainer.run import loop

BASE = {"model": {"pretrained": "m"}, "data": {"path": "d"}, "output_dir": "o"}


def build(**tables) -> config.RunConfig:
    return config.build({**BASE, **tables})


# ---------------------------------------------------------------- the groups


def test_groups_are_named_and_scaled_by_multiplier_and_plus_ratio():
    cfg = build(
        lora={"plus_ratio": 16.0, "down_lr_weight": [1, 0.5, 0], "up_lr_weight": [2, 0.5],
              "train_text_encoder": True},
        train={"learning_rate": 1e-4, "text_encoder_lr": 5e-5},
    )  # fmt: skip
    got = {g.name: g.base_lr for g in cfg.lr_groups()}
    assert list(got) == [
        "unet", "unet_plus", "unet_x0.5", "unet_x0.5_plus", "unet_x2", "unet_x2_plus",
        "text_encoder", "text_encoder_plus",
    ]  # fmt: skip
    expected = [1e-4, 16e-4, 0.5e-4, 8e-4, 2e-4, 32e-4, 5e-5, 80e-5]
    assert list(got.values()) == pytest.approx(expected, rel=1e-12)
    assert cfg.base_lrs() == list(got.values())


def test_without_the_new_keys_the_groups_are_one_per_model():
    cfg = build(lora={"train_text_encoder": True})
    assert cfg.lr_group_names() == ["unet", "text_encoder"]


@pytest.mark.parametrize(
    ("tables", "expected"),
    [
        ({"lora": {"type": "loha", "plus_ratio": 4.0}}, "lora.plus_ratio: applies only to"),
        ({"lora": {"type": "lokr", "plus_ratio": 4.0}}, "lora.plus_ratio: applies only to"),
        ({"lora": {"plus_ratio": -1.0}}, "lora.plus_ratio: -1.0 must be >= 0"),
        ({"lora": {"down_lr_weight": [1, -0.5]}}, "lora.down_lr_weight: [1.0, -0.5]"),
        ({"lora": {"up_lr_weight": [1.0] * 13}}, "lora.up_lr_weight"),
        (
            {"lora": {"mid_lr_weight": [1, 1]}, "model": {"pretrained": "m", "arch": "sd1"}},
            "lora.mid_lr_weight: 2 values, but a sd1 UNet has 1 mid block(s)",
        ),
    ],
)
def test_impossible_group_settings_are_config_errors(tables, expected):
    with pytest.raises(config.ConfigError) as err:
        build(**tables)
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_sdxl_block_lists_are_checked_against_its_nine_blocks():
    from trainer.config.lr_groups import block_weight_problems

    lora = config.LoraConfig(down_lr_weight=(1.0,) * 10, mid_lr_weight=(1.0,) * 3)
    (problem,) = block_weight_problems(lora, "sdxl")
    assert "lora.down_lr_weight: 10 values, but a sdxl UNet has 9 down block(s)" in problem
    (problem,) = block_weight_problems(lora, "sd1")
    assert problem.startswith("lora.mid_lr_weight: 3 values, but a sd1 UNet has 1 mid block(s)")


# ---------------------------------------------------------------- kohya's block numbering

KOHYA_UPDOWN = re.compile(
    r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_"
)


def kohya_block_index(name: str, sdxl: bool) -> int:
    """kohya's get_block_index on a kohya module name (-1: none)."""
    if sdxl:
        rest = name.removeprefix("lora_unet_")
        for prefix, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
            if rest.startswith(prefix):
                return first + int(rest.split("_")[2])
        return -1
    if m := KOHYA_UPDOWN.search(name):
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + idx if side == "down" else 12 + 1 + idx
    return 12 if "mid_block_" in name else -1


def kohya_lr_weight(down, mid, up, sdxl: bool) -> list[float]:
    """kohya's list of multipliers by block index (get_block_lr_weight), filled with 1."""
    n, n_mid = (9, 3) if sdxl else (12, 1)
    pad = lambda values, k: list(values) + [1.0] * (k - len(values))  # noqa: E731
    weights = pad(down, n) + pad(mid, n_mid) + pad(up, n)
    return [1.0, *weights, 1.0] if sdxl else weights


def adaptable_paths(unet: torch.nn.Module) -> list[str]:
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return [n for n, m in unet.named_modules() if isinstance(m, kinds)]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_module_gets_the_multiplier_kohyas_rule_gives_it(family, tiny_sdxl):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    sdxl = family == "sdxl"
    with init_empty_weights():  # SD 1.5's layout is diffusers' default; SDXL's from the tiny one
        config_dict = UNet2DConditionModel.load_config(tiny_sdxl, subfolder="unet") if sdxl else {}
        unet = UNet2DConditionModel.from_config(config_dict)
    n = 9 if sdxl else 12
    down = [round(0.1 * (k + 1), 2) for k in range(n)]
    mid = [3.0, 4.0, 5.0][: 3 if sdxl else 1]
    up = [round(10 + k, 2) for k in range(n)]
    lora = config.LoraConfig(down_lr_weight=down, mid_lr_weight=mid, up_lr_weight=up)
    weights = kohya_lr_weight(down, mid, up, sdxl)
    arch = get_architecture(family)
    seen = set()
    for path in adaptable_paths(unet):
        index = kohya_block_index(kohya_name("unet", path, arch), sdxl)
        expected = 1.0 if index < 0 else weights[index]
        assert blocks.block_multiplier(path, lora, sdxl) == expected, path
        seen.add(index)
    assert len(seen) > (20 if not sdxl else 6)  # the rule was exercised across the blocks


# ---------------------------------------------------------------- which tensor trains where


def test_each_adapter_tensor_is_in_its_kohya_block_group_and_plus_group(tiny_model):
    from diffusers import UNet2DConditionModel

    from trainer.lora import adapters

    # IN02 (down_blocks.0's second layer) does not exist in the tiny UNet: an empty group.
    lora = {"plus_ratio": 8.0, "down_lr_weight": [1, 1, 0.5], "up_lr_weight": [0, 0, 0, 0]}
    cfg = build(lora=lora)
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    adapters.attach(unet, None, cfg.lora)
    groups = blocks.param_groups(cfg.lr_groups(), cfg.lora, {"unet": unet}, sdxl=False)
    where = {id(p): g.name for g in groups for p in g.params}
    weights = kohya_lr_weight([1, 1, 0.5], [], [0, 0, 0, 0], sdxl=False)
    arch = get_architecture("sd1")
    trained = frozen = 0
    for name, param in unet.named_parameters():
        if "lora_" not in name:
            continue
        module = name.split(".lora_")[0]
        m = weights[kohya_block_index(kohya_name("unet", module, arch), False)]
        if m == 0:
            assert not param.requires_grad and id(param) not in where, name
            frozen += 1
            continue
        base = "unet" if m == 1 else f"unet_x{m:g}"
        assert where[id(param)] == (f"{base}_plus" if ".lora_B." in name else base), name
        trained += 1
    assert trained and frozen  # the tiny UNet adapts IN01, the mid block, OUT03 and OUT04
    assert {g.name: len(g.params) > 0 for g in groups} == {
        "unet": True,
        "unet_plus": True,
        "unet_x0.5": False,
        "unet_x0.5_plus": False,
    }  # fmt: skip


# ---------------------------------------------------------------- a run

GROUP_RUN = (
    "train.max_steps=4",
    "train.batch_size=2",
    "train.gradient_accumulation_steps=1",
    "train.learning_rate=1e-3",
    "lora.plus_ratio=4.0",
    "lora.mid_lr_weight=[0.5]",
    "lora.up_lr_weight=[1, 1, 1, 0, 2]",  # OUT03 frozen, OUT04 at twice the LR
    'lora.save_dtype="fp32"',
    'lr_scheduler={name = "cosine", warmup_steps = 1, min_lr_ratio = 0.1}',
    "checkpoint.every_n_steps=2",
)


@pytest.fixture(scope="module")
def group_run(tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("groups")
    cfg = tiny_config(out, *GROUP_RUN)
    loop.run(cfg)
    return cfg, out


def test_each_groups_lr_is_base_times_multiplier_times_the_schedule_factor(group_run):
    cfg, out = group_run
    records = read_metrics(out)
    names = ["unet", "unet_plus", "unet_x0.5", "unet_x0.5_plus", "unet_x2", "unet_x2_plus"]
    multiplier = {"unet": 1, "unet_x0.5": 0.5, "unet_x2": 2}
    for r in records:
        assert r["lr_groups"] == names
        factor = cfg.lr_scheduler.lr(r["step"] - 1, 4, 1.0)  # the schedule at base LR 1
        expected = [
            1e-3 * multiplier[n.removesuffix("_plus")] * (4.0 if n.endswith("_plus") else 1.0)
            * factor
            for n in names
        ]  # fmt: skip
        assert r["lr"] == pytest.approx(expected, rel=1e-12)


def test_a_zero_multiplier_freezes_its_block(group_run):
    _, out = group_run
    weights = load_file(out / WEIGHTS_NAME)
    up = [k for k in weights if k.startswith("unet.up_blocks.1.") and ".lora_B." in k]
    frozen = [k for k in up if ".attentions.0." in k]  # OUT03: up_blocks.1.attentions.0
    trained = [k for k in up if ".attentions.1." in k]  # OUT04
    assert frozen and trained
    assert all(torch.count_nonzero(weights[k]) == 0 for k in frozen)
    assert all(torch.count_nonzero(weights[k]) > 0 for k in trained)


def test_a_run_with_groups_resumes_bitwise(group_run, tiny_config, tmp_path):
    _, out = group_run
    resumed = tmp_path / "resumed"
    loop.run(tiny_config(resumed, *GROUP_RUN, f'checkpoint.resume="{ckpt.step_dir(out, 2)}"'))
    a, b = load_file(out / WEIGHTS_NAME), load_file(resumed / WEIGHTS_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_kohya_file_records_the_groups_as_kohyas_network_args(group_run):
    import json

    from trainer.lora.files import read_header

    _, out = group_run
    (kohya_file,) = [p for p in out.glob("*.safetensors") if p.name != WEIGHTS_NAME]
    args = json.loads(read_header(kohya_file).metadata["ss_network_args"])
    assert args == {
        "loraplus_lr_ratio": "4.0",
        "mid_lr_weight": "0.5",
        "up_lr_weight": "1.0,1.0,1.0,0.0,2.0",
    }


def test_group_keys_cannot_change_on_resume(group_run, tiny_config, tmp_path):
    _, out = group_run
    start = f'checkpoint.resume="{ckpt.step_dir(out, 2)}"'
    changed = [*GROUP_RUN, "lora.plus_ratio=0.0", start, "checkpoint.allow_change=['lora']"]
    with pytest.raises(config.ConfigError, match="decide the optimizer's param groups"):
        loop.run(tiny_config(tmp_path / "changed", *changed))


def test_the_sweeps_lr_curves_name_each_runs_own_groups(monkeypatch):
    """A LoRA+ axis gives its runs other groups: each run's curves carry that run's names (the
    first group is the configuration's label alone), with the LRs its metrics.jsonl holds."""
    from types import SimpleNamespace

    from schedulers import preview
    from trainer.sweep import figures

    drawn = []

    def spy(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    real = preview.lr_figure
    monkeypatch.setattr(figures.preview, "lr_figure", spy)

    def result(label, groups, lrs):
        metrics = [{"step": s, "lr": row, "lr_groups": groups} for s, row in enumerate(lrs, 1)]
        return SimpleNamespace(
            metrics=metrics, run=SimpleNamespace(point=SimpleNamespace(label=label))
        )

    off = [[1e-3], [5e-4]]
    on = [[1e-3, 4e-3], [5e-4, 2e-3]]
    figures.lr_figure(
        [result("plus_ratio=0", ["unet"], off), result("plus_ratio=4", ["unet", "unet_plus"], on)]
    )
    lines = drawn[0].axes[0].get_lines()
    assert [line.get_label() for line in lines] == [
        "plus_ratio=0",
        "plus_ratio=4",
        "plus_ratio=4 (unet_plus)",
    ]
    assert [list(line.get_ydata()) for line in lines] == [
        [1e-3, 5e-4],
        [1e-3, 5e-4],
        [4e-3, 2e-3],
    ]
