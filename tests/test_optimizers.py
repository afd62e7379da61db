"""The [optimizer] table: registry, strict keys, interplay rules, deprecated [train] keys, and
each optimizer's state surviving a weights-only save and load exactly (no model needed)."""

from __future__ import annotations

import copy
import io
import logging
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainer import optimizers
from trainer.config import load as config
from trainer.config.deprecated import MOVED
from trainer.config.load import ConfigError
from trainer.optimizers import registry
from trainer.optimizers.modes import TRAIN_WEIGHTS
from trainer.run.resume import check_resumable, comparable_config, config_diff

REPO = Path(__file__).resolve().parents[1]
BUILTINS = [
    "adafactor", "adamw", "adamw8bit", "came", "lion", "prodigy", "schedule_free_adamw", "sgd",
]  # fmt: skip
MINIMAL = {"model": {"pretrained": "m"}, "data": {"path": "d"}}


def build(**tables) -> config.RunConfig:
    return config.build({**MINIMAL, **tables})


def problems_of(**tables) -> list[str]:
    with pytest.raises(ConfigError) as err:
        build(**tables)
    return err.value.problems


def warnings_of(caplog, **tables) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdlora"):
        build(**tables)
    return [r.getMessage() for r in caplog.records]


# ---------------------------------------------------------------- registry and keys


def test_builtins_are_registered_and_adamw_is_the_default():
    assert optimizers.available() == BUILTINS
    assert build().optimizer == optimizers.get("adamw")()
    assert build(optimizer={"weight_decay": 0.1}).optimizer.name == "adamw"


def test_unknown_name_suggests_the_closest():
    (problem,) = problems_of(optimizer={"name": "prodigi"})
    assert problem.startswith("optimizer.name: unknown optimizer 'prodigi'")
    assert "did you mean 'prodigy'?" in problem and "schedule_free_adamw" in problem


def test_every_key_problem_at_once_with_hints():
    found = problems_of(
        optimizer={
            "name": "adamw",
            "beta_1": 0.9,  # typo
            "betas": [0.9, 0.99],  # a peer's spelling
            "lr": 1e-4,  # lives in [train]
            "adam_epsilon": 1e-8,  # a peer's name for eps
            "d_coef": 2.0,  # a key of another optimizer
            "beta2": 1.5,  # out of range
            "impl": "fusd",  # a typo in a choice
        }
    )
    assert len(found) == 7, found
    joined = "\n".join(found)
    assert (
        "optimizer.beta_1: unknown key for the 'adamw' optimizer; did you mean optimizer.beta1?"
        in found
    )
    assert "optimizer.betas" in joined and "beta1, beta2" in joined
    assert "optimizer.lr" in joined and "train.learning_rate" in joined
    assert "optimizer.adam_epsilon: unknown key for the 'adamw' optimizer; sdlora calls" in joined
    assert "optimizer.d_coef" in joined and "it is a key of: prodigy" in joined
    assert "optimizer.beta2: 1.5 must be in [0, 1)" in joined
    assert 'optimizer.impl: "fusd" is not one of' in joined and 'did you mean "fused"' in joined


def test_a_dotted_path_names_an_optimizer_outside_the_registry(tmp_path, monkeypatch):
    (tmp_path / "my_optim.py").write_text(
        textwrap.dedent(
            '''
            from dataclasses import dataclass

            import torch

            from trainer.optimizers import OptimizerSpec
            from typedtables import doc


            @dataclass(frozen=True)
            class Rprop(OptimizerSpec):
                """torch's Rprop."""

                etaminus: float = doc("Multiplicative decrease factor", 0.5)

                def create(self, groups):
                    return torch.optim.Rprop(groups, etas=(self.etaminus, 1.2))
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_optim", raising=False)
    cfg = build(optimizer={"name": "my_optim:Rprop", "etaminus": 0.4})
    assert cfg.optimizer.etaminus == 0.4
    assert config.build(cfg.to_dict()) == cfg
    model = torch.nn.Linear(2, 2)
    opt = optimizers.create(cfg.optimizer, [model], [0.1])
    assert isinstance(opt, torch.optim.Rprop) and opt.param_groups[0]["etas"] == (0.4, 1.2)
    (problem,) = problems_of(optimizer={"name": "my_optim:Rprp"})
    assert "has no attribute 'Rprp'; did you mean 'Rprop'?" in problem


def test_registering_a_taken_name_or_a_class_without_create_fails_loudly():
    from dataclasses import dataclass

    with registry.REGISTRY.isolated():
        with pytest.raises(optimizers.OptimizerRegistryError, match="defined twice"):

            @registry.register("adamw")
            @dataclass(frozen=True)
            class Other(optimizers.OptimizerSpec):
                def create(self, groups):
                    return torch.optim.SGD(groups)

        with pytest.raises(optimizers.OptimizerRegistryError, match="does not implement create"):

            @registry.register("nothing")
            @dataclass(frozen=True)
            class Nothing(optimizers.OptimizerSpec):
                pass

    assert optimizers.available() == BUILTINS


def test_a_missing_optional_package_names_the_extra_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name)
    )
    found = problems_of(optimizer={"name": "prodigy"}, train={"learning_rate": 1.0})
    assert found == [
        "optimizer.name: 'prodigy' needs the prodigyopt package, which is not installed; "
        "install it with: pip install 'sdlora[prodigy]'"
    ]


def test_every_optional_optimizer_has_its_extra_in_pyproject():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for name in BUILTINS:
        cls = optimizers.get(name)
        if cls.package:
            assert cls.extra in extras, name
            assert set(extras[cls.extra]) <= set(extras["optimizers"]) <= set(extras["dev"])


# ---------------------------------------------------------------- sweeps: whole-table overrides


def test_set_optimizer_name_over_a_table_without_foreign_keys_validates(tmp_path):
    cfg = config.load(REPO / "configs" / "tiny.toml", ["optimizer.name=prodigy"])
    assert cfg.optimizer == optimizers.get("prodigy")()


def test_set_optimizer_name_over_another_optimizers_keys_says_to_replace_the_table():
    with pytest.raises(ConfigError) as err:
        config.load(REPO / "configs" / "lora.toml", ['optimizer.name="lion"'])
    joined = "\n".join(err.value.problems)
    assert "optimizer.eps: unknown key for the 'lion' optimizer" in joined
    assert "--set 'optimizer={name = \"lion\"}'" in joined


def test_a_whole_optimizer_table_replaces_the_files_table():
    cfg = config.load(
        REPO / "configs" / "lora.toml",
        ['optimizer={name = "lion", beta2 = 0.98, weight_decay = 0.1}'],
    )
    assert cfg.optimizer == optimizers.get("lion")(beta2=0.98, weight_decay=0.1)


@pytest.mark.parametrize("name", BUILTINS)
def test_every_optimizer_round_trips_through_the_resolved_config(name, tmp_path):
    lr = {"learning_rate": 1.0} if name == "prodigy" else {}
    sched = {"name": "constant"}
    cfg = build(optimizer={"name": name}, train=lr, lr_scheduler=sched)
    path = tmp_path / "config.toml"
    path.write_text(config.to_toml(cfg.to_dict()))
    assert config.load(path) == cfg


# ---------------------------------------------------------------- interplay rules


@pytest.mark.parametrize("schedule", ["cosine", "linear", "warmup_stable_decay", "rex"])
def test_schedule_free_with_a_decaying_schedule_is_an_error(schedule):
    found = problems_of(optimizer={"name": "schedule_free_adamw"}, lr_scheduler={"name": schedule})
    (problem,) = found
    assert problem.startswith("optimizer.name: 'schedule_free_adamw' is schedule-free")
    assert f"lr_scheduler.name = '{schedule}' would decay it twice" in problem
    assert '"constant" or "constant_with_warmup"' in problem


@pytest.mark.parametrize("schedule", ["constant", "constant_with_warmup"])
def test_schedule_free_with_a_constant_schedule_and_warmup_is_fine(schedule):
    cfg = build(
        optimizer={"name": "schedule_free_adamw"},
        lr_scheduler={"name": schedule, "warmup_steps": 10},
        train={"max_steps": 100},
    )
    assert cfg.optimizer.schedule_free


def test_prodigy_with_an_adam_sized_lr_warns_why(caplog):
    (warning,) = warnings_of(caplog, optimizer={"name": "prodigy"}, train={"learning_rate": 1e-4})
    assert "train.learning_rate = 0.0001 with optimizer.name = 'prodigy'" in warning
    assert "estimates the step size itself" in warning and "10,000× smaller" in warning
    assert "use 1.0" in warning and "d_coef" in warning
    assert warnings_of(caplog, optimizer={"name": "prodigy"}, train={"learning_rate": 1.0}) == []
    assert warnings_of(caplog, optimizer={"name": "adamw"}, train={"learning_rate": 1e-4}) == []


def test_prodigy_refuses_different_lrs_for_unet_and_text_encoder():
    (problem,) = problems_of(
        optimizer={"name": "prodigy"},
        lora={"train_text_encoder": True},
        train={"learning_rate": 1.0, "text_encoder_lr": 0.5},
    )
    assert problem.startswith("train.text_encoder_lr = 0.5 differs from train.learning_rate = 1.0")
    assert "set train.text_encoder_lr = 0" in problem
    build(
        optimizer={"name": "prodigy"},
        lora={"train_text_encoder": True},
        train={"learning_rate": 1.0},
    )


def test_prodigy_with_warmup_and_no_safeguard_warns(caplog):
    tables = {
        "optimizer": {"name": "prodigy", "safeguard_warmup": False},
        "train": {"learning_rate": 1.0, "max_steps": 100},
        "lr_scheduler": {"name": "cosine", "warmup_steps": 10},
    }
    (warning,) = warnings_of(caplog, **tables)
    assert warning.startswith("config: optimizer.safeguard_warmup: false while the LR schedule")
    tables["optimizer"]["safeguard_warmup"] = True
    assert warnings_of(caplog, **tables) == []


def test_text_encoder_weight_decay_without_text_encoder_training_is_an_error():
    (problem,) = problems_of(optimizer={"text_encoder_weight_decay": 0.0})
    assert problem.startswith("optimizer.text_encoder_weight_decay: set, but lora.train_text")


# ---------------------------------------------------------------- the old [train] keys

OLD_TRAIN = {
    "optimizer": "adamw",
    "adam_beta1": 0.8,
    "adam_beta2": 0.99,
    "adam_epsilon": 1e-7,
    "weight_decay": 0.05,
    "optimizer_impl": "foreach",
}


def test_old_train_keys_still_work_with_one_warning_naming_the_new_keys(caplog):
    warnings = warnings_of(caplog, train={**OLD_TRAIN, "learning_rate": 1e-3})
    (warning,) = warnings
    for old, new in MOVED.items():
        assert f"train.{old} → optimizer.{new}" in warning
    assert '[optimizer]\nname = "adamw"\nbeta1 = 0.8' in warning
    old = build(train={**OLD_TRAIN, "learning_rate": 1e-3})
    new = build(
        train={"learning_rate": 1e-3},
        optimizer={
            "name": "adamw", "beta1": 0.8, "beta2": 0.99, "eps": 1e-7, "weight_decay": 0.05,
            "impl": "foreach",
        },
    )  # fmt: skip
    assert old == new


def test_an_old_config_keeps_the_old_defaults():
    cfg = build(train={"optimizer": "sgd"})
    # The old [train] table's weight decay (1e-2) and kernel ("default"), not sgd's new defaults.
    assert cfg.optimizer == optimizers.get("sgd")(weight_decay=1e-2, impl="default")


def test_adamw_keys_beside_the_old_sgd_are_ignored_as_before_and_said_so(caplog):
    (warning,) = warnings_of(caplog, train={"optimizer": "sgd", "adam_beta1": 0.5})
    assert "train.adam_beta1: AdamW settings, ignored by 'sgd'" in warning


def test_old_and_new_keys_together_are_an_error():
    found = problems_of(train={"adam_beta1": 0.8}, optimizer={"name": "adamw", "beta1": 0.7})
    assert found == [
        "train.adam_beta1: the old place of optimizer.beta1, given together with an [optimizer] "
        "table; move it into [optimizer] as beta1 (or drop it)"
    ]


def test_a_misspelled_old_key_points_at_the_optimizer_table():
    (problem,) = problems_of(train={"optimiser": "adamw"})
    assert "the optimizer settings are the [optimizer] table now" in problem
    assert "optimizer.name" in problem


def test_a_checkpoint_written_before_the_optimizer_table_still_resumes():
    cfg = build(train={"optimizer": "adamw"})
    saved = cfg.to_dict()
    table = saved.pop("optimizer")
    saved["train"].update(
        optimizer="adamw", adam_beta1=table["beta1"], adam_beta2=table["beta2"],
        adam_epsilon=table["eps"], weight_decay=table["weight_decay"],
        optimizer_impl=table["impl"],
    )  # fmt: skip
    assert config_diff(saved, cfg.to_dict()) == []


def test_the_optimizer_cannot_change_on_resume_even_when_allowed():
    old = comparable_config(build().to_dict(), 1)
    new = comparable_config(build(optimizer={"weight_decay": 0.1}).to_dict(), 1)
    with pytest.raises(ConfigError) as err:
        check_resumable(old, new, ["optimizer"], "ckpt")
    text = str(err.value)
    assert "optimizer.weight_decay: 0.01 (checkpoint) → 0.1 (now)" in text
    assert "cannot change on resume, not even with --allow-change" in text
    assert "accept the change with" not in text


# ---------------------------------------------------------------- param groups and state


def two_models(seed: int = 0) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    return [torch.nn.Linear(8, 6), torch.nn.Linear(6, 4, bias=False)]


def feed(models, step: int) -> None:
    """Gradients of a fixed loss at a fixed input, different each step."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(5, 8, generator=gen)
    loss = models[1](torch.tanh(models[0](x))).square().mean()
    for m in models:
        m.zero_grad(set_to_none=True)
    loss.backward()


def test_each_group_gets_its_own_base_lr_and_weight_decay():
    spec = optimizers.get("adamw")(weight_decay=0.1, text_encoder_weight_decay=0.0)
    opt = optimizers.create(spec, two_models(), [1e-3, 5e-4])
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(1e-3, 0.1), (5e-4, 0.0)]
    opt = optimizers.create(optimizers.get("lion")(weight_decay=0.3), two_models(), [1e-4, 1e-4])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.3]
    assert spec.weight_decays(1) == [0.1]
    assert spec.weight_decays(3) == [0.1, 0.0, 0.0]  # SDXL: one UNet, two text encoders


def spec_for(name: str) -> optimizers.OptimizerSpec:
    cls = optimizers.get(name)
    return cls(min_8bit_size=0) if name == "adamw8bit" else cls()


@pytest.mark.parametrize("name", BUILTINS)
def test_state_survives_a_weights_only_save_and_load_exactly(name):
    """Ten steps, save, load into a fresh optimizer, one more step: bitwise the same as going
    on."""
    spec = spec_for(name)
    if spec.device_problems(torch.device("cpu")):
        pytest.skip(f"{name} cannot run on this CPU")
    lrs = [1.0, 1.0] if name == "prodigy" else [1e-1, 5e-2]
    models = two_models()
    opt = optimizers.create(spec, models, lrs)
    for step in range(10):
        feed(models, step)
        opt.step()
    if spec.schedule_free:
        # schedulefree's eval()/train() round trip would not give the train weights back bit
        # for bit here, so resuming exactly needs the saved train weights.
        twin_models, twin = copy.deepcopy((models, opt))
        twin.eval()
        twin.train()
        pairs = zip(twin_models, models, strict=True)
        assert any(not torch.equal(a.weight, b.weight) for a, b in pairs)
    buffer = io.BytesIO()
    with optimizers.eval_mode(opt):
        torch.save(optimizers.checkpoint_state(opt), buffer)
        saved_weights = [p.detach().clone() for m in models for p in m.parameters()]
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = two_models(seed=1)  # other initial weights: everything must come from the save
    with torch.no_grad():
        for p, w in zip([p for m in resumed for p in m.parameters()], saved_weights, strict=True):
            p.copy_(w)
    opt2 = optimizers.create(spec, resumed, lrs)
    optimizers.load_checkpoint_state(opt2, state)
    for m in (models, resumed):
        feed(m, 10)
    opt.step()
    opt2.step()
    for a, b in zip(
        [p for m in models for p in m.parameters()],
        [p for m in resumed for p in m.parameters()],
        strict=True,
    ):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- schedule-free modes


def test_eval_mode_gives_schedulefrees_own_eval_weights_and_restores_train_weights_exactly():
    models = two_models()
    opt = optimizers.create(optimizers.get("schedule_free_adamw")(), models, [0.1, 0.1])
    for step in range(10):
        feed(models, step)
        opt.step()
    params = [p for m in models for p in m.parameters()]
    train_weights = [p.detach().clone() for p in params]
    # The reference: schedulefree's own eval() on a copy, and its documented formula
    # x = (y - (1 - beta1) z) / beta1 in float64.
    twin_models, twin = copy.deepcopy((models, opt))
    twin.eval()
    reference = [p.detach().clone() for m in twin_models for p in m.parameters()]
    # Here schedulefree's own eval()/train() round trip does not give y back bit for bit, so
    # the exact restore checked below is not a coincidence.
    twin.train()
    twin_params = [p for m in twin_models for p in m.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(twin_params, train_weights, strict=True))
    beta1 = opt.param_groups[0]["betas"][0]
    with optimizers.eval_mode(opt):
        assert not opt.param_groups[0]["train_mode"]
        for p, x, y in zip(params, reference, train_weights, strict=True):
            assert torch.equal(p, x)
            z = opt.state[p]["z"].double()
            formula = (y.double() - (1 - beta1) * z) / beta1
            torch.testing.assert_close(p.double(), formula, rtol=1e-6, atol=1e-7)
        assert any(not torch.equal(p, y) for p, y in zip(params, train_weights, strict=True))
        state = optimizers.checkpoint_state(opt)
        assert all(
            torch.equal(a, b) for a, b in zip(state[TRAIN_WEIGHTS], train_weights, strict=True)
        )
    assert opt.param_groups[0]["train_mode"]
    assert all(torch.equal(p, y) for p, y in zip(params, train_weights, strict=True))
    assert TRAIN_WEIGHTS not in optimizers.checkpoint_state(opt)  # only while held


def test_eval_mode_changes_nothing_for_other_optimizers():
    models = two_models()
    opt = optimizers.create(optimizers.get("adamw")(), models, [1e-2, 1e-2])
    feed(models, 0)
    opt.step()
    before = [p.detach().clone() for m in models for p in m.parameters()]
    with optimizers.eval_mode(opt):
        state = optimizers.checkpoint_state(opt)
    assert TRAIN_WEIGHTS not in state
    after = [p for m in models for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


# ---------------------------------------------------------------- effective LR and devices


def test_prodigy_reports_the_step_size_each_update_takes():
    models = two_models()
    # Without the warmup safeguard d grows within a few updates on this small problem.
    spec = optimizers.get("prodigy")(safeguard_warmup=False)
    opt = optimizers.create(spec, models, [0.5, 0.5])
    assert optimizers.step_metrics(opt) == {}
    for step in range(10):
        group = opt.param_groups[0]
        d, k = group["d"], group["k"]  # what prodigyopt's step is about to use
        beta1, beta2 = group["betas"]
        correction = (1 - beta2 ** (k + 1)) ** 0.5 / (1 - beta1 ** (k + 1))
        feed(models, step)
        opt.step()
        assert optimizers.step_metrics(opt) == {"effective_lr": [d * 0.5 * correction] * 2}
        assert optimizers.step_metrics(opt) == {}  # read once per update
    assert opt.param_groups[0]["d"] != spec.d0  # d moved, so the check above saw real values
    models = two_models()
    adamw = optimizers.create(optimizers.get("adamw")(), models, [1e-3, 1e-3])
    feed(models, 0)
    adamw.step()
    assert optimizers.step_metrics(adamw) == {}  # its step size is the LR: nothing extra


def test_adamw8bit_that_cannot_run_here_is_a_clear_error(monkeypatch):
    import bitsandbytes

    def no_kernel(self, closure=None):
        raise NotImplementedError("no 8-bit kernel for this device")

    monkeypatch.setattr(bitsandbytes.optim.AdamW8bit, "step", no_kernel)
    spec = optimizers.get("adamw8bit")()
    with pytest.raises(ConfigError) as err:
        optimizers.check_device(spec, torch.device("cpu"))
    (problem,) = err.value.problems
    assert problem.startswith("optimizer.name: 'adamw8bit' cannot run on this device (cpu)")
    assert "NotImplementedError: no 8-bit kernel for this device" in problem
    assert 'optimizer.name = "adamw" here' in problem


def test_a_fused_kernel_the_device_lacks_is_an_error_and_auto_falls_back():
    meta = torch.device("meta")  # a device no fused kernel exists for
    spec = optimizers.get("adamw")(impl="fused")
    (problem,) = spec.device_problems(meta)
    assert problem.startswith("optimizer.impl: 'fused' AdamW is not available on meta")
    assert optimizers.get("adamw")(impl="auto").device_problems(meta) == []
    model = torch.nn.Linear(2, 2, device=meta)
    opt = optimizers.create(optimizers.get("adamw")(impl="auto"), [model], [1e-3])
    assert not opt.param_groups[0]["fused"]
    cpu = optimizers.create(optimizers.get("adamw")(impl="auto"), [torch.nn.Linear(2, 2)], [1e-3])
    assert cpu.param_groups[0]["fused"]  # torch >= 2.4 fuses AdamW on CPU


def test_the_docs_describe_every_optimizer_and_key():
    import dataclasses

    from typedtables import toml_value

    text = (REPO / "docs" / "optimizers.md").read_text()
    for name in BUILTINS:
        cls = optimizers.get(name)
        assert f"### {name}\n" in text, name
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}`"))
        for f in dataclasses.fields(cls):
            if f.name == "text_encoder_weight_decay":
                continue  # the same for every optimizer; documented once
            if f.name == "weight_decay":
                assert f"| `{toml_value(f.default)}` |" in row, (name, f.name)
            else:
                shown = f"`{f.name} = {toml_value(f.default)}`"
                assert shown in row, (name, shown)


def test_describe_and_from_table_share_the_schedules_table_helpers():
    """optimizers.config and schedulers.config describe and build through the same typedtables
    functions: name, docstring, the optional package's extra, then every key."""
    from trainer.optimizers import config as optimizer_config

    text = optimizer_config.describe("prodigy")
    lines = text.splitlines()
    assert lines[0] == "prodigy" and "  needs: pip install 'sdlora[prodigy]'" in lines
    assert '  keys of [optimizer] with name = "prodigy":' in lines
    assert any(line.startswith("    d_coef (float, default ") for line in lines)
    assert "needs:" not in optimizer_config.describe("adamw")
    with pytest.raises(ConfigError) as err:
        optimizer_config.from_table({"name": "adamw", "beta3": 0.9})
    assert err.value.source == optimizer_config.SOURCE
    assert err.value.problems[0].startswith("optimizer.beta3: unknown key")
