"""The schedule registry: names, duplicates, plug-ins by entry point and by dotted path.

Every test that registers something runs inside ``registry.REGISTRY.isolated()`` (the ``registry``
fixture), so no registration or entry-point scan leaks into another test.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
import sys
import textwrap
from dataclasses import dataclass

import pytest

import schedulers
from schedulers import registry
from schedulers.errors import ScheduleRegistryError, UnknownScheduleError
from schedulers.fields import doc

BUILTINS = [
    "constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "exponential_ramp",
    "inverse_sqrt",
    "linear", "multistep", "piecewise_constant", "polynomial", "rex", "sine", "step",
    "warmup_stable_decay",
]  # fmt: skip

PLUGIN_SOURCE = '''
from dataclasses import dataclass

from schedulers import DecaySchedule
from schedulers.fields import doc


@dataclass(frozen=True)
class HalfLife(DecaySchedule):
    """Halve the LR every half_life updates."""

    half_life: int = doc("Updates per halving", 10)

    def decay(self, t: int, n: int) -> float:
        return 0.5 ** (t / self.half_life)
'''


@pytest.fixture
def registry_snapshot():
    """Undo every registration and entry-point scan a test makes."""
    with registry.REGISTRY.isolated():
        registry.refresh_entry_points()
        yield registry
    # The snapshot restored the previous scan; drop it so later lookups re-read sys.path.
    registry.refresh_entry_points()


def install_plugin(tmp_path, monkeypatch, dist, module, entry_points, source=PLUGIN_SOURCE):
    """Write a package and its dist-info into tmp_path, as pip would, and put it on sys.path."""
    (tmp_path / module).mkdir()
    (tmp_path / module / "__init__.py").write_text(source)
    info = tmp_path / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    registry.refresh_entry_points()


def write_module(tmp_path, monkeypatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


# ---------------------------------------------------------------- built-ins and lookups


def test_builtins_are_registered_under_their_names():
    assert schedulers.available() == BUILTINS
    for name in BUILTINS:
        cls = schedulers.get(name)
        assert cls.name == name
        assert cls.__module__ == f"schedulers.{name}"  # one schedule per file, named after it
        assert cls.__doc__ and cls.__doc__.strip()


def test_unknown_name_lists_what_exists_and_suggests_the_closest():
    with pytest.raises(UnknownScheduleError) as err:
        schedulers.get("cosin")
    assert isinstance(err.value, KeyError)
    text = str(err.value)
    assert text.startswith("unknown LR schedule 'cosin'; did you mean 'cosine'? Available: ")
    assert "constant, constant_with_warmup, cosine, " in text
    assert '"package.module:ClassName"' in text
    assert err.value.suggestion == "cosine" and err.value.available == BUILTINS


def test_errors_survive_pickling():
    import pickle

    with pytest.raises(UnknownScheduleError) as unknown:
        schedulers.get("cosin")
    for err in (
        unknown.value,
        ScheduleRegistryError("broken"),
        schedulers.ScheduleConfigError(["lr_scheduler.x: bad"]),
    ):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err)


def test_unknown_name_without_a_close_match():
    with pytest.raises(UnknownScheduleError) as err:
        schedulers.get("zzzz")
    assert err.value.suggestion is None and "did you mean" not in str(err.value)


def test_duplicate_name_names_both_definitions(registry_snapshot):
    @schedulers.register("dup_schedule")
    @dataclass(frozen=True)
    class First(schedulers.Schedule):
        def after_warmup(self, t, n, base_lr):
            return base_lr

    @dataclass(frozen=True)
    class Second(First):
        pass

    with pytest.raises(ScheduleRegistryError) as err:
        schedulers.register("dup_schedule")(Second)
    here = __name__
    assert str(err.value) == (
        f"LR schedule name 'dup_schedule' is defined twice: by "
        f"{here}:test_duplicate_name_names_both_definitions.<locals>.First and by "
        f"{here}:test_duplicate_name_names_both_definitions.<locals>.Second; rename one of them"
    )
    with pytest.raises(ScheduleRegistryError, match=r"by schedulers\.cosine:Cosine and by"):
        schedulers.register("cosine")(Second)


def test_registrations_do_not_leak_between_tests():
    assert "dup_schedule" not in schedulers.available()
    assert schedulers.available() == BUILTINS


@pytest.mark.parametrize("name", ["", "has space", "pkg.mod:Cls", 3])
def test_malformed_names_are_refused(name):
    with pytest.raises(ScheduleRegistryError, match="use letters, digits"):
        schedulers.register(name)


def test_register_checks_the_schedule_contract(registry_snapshot):
    # A non-frozen dataclass cannot subclass the frozen Schedule at all (Python refuses it);
    # a subclass that forgot the decorator is the case to catch.
    class Undecorated(schedulers.get("cosine")):
        pass

    @dataclass(frozen=True)
    class NoCurve(schedulers.DecaySchedule):
        pass

    @dataclass(frozen=True)
    class Undocumented(schedulers.Schedule):
        knob: int = 3

        def after_warmup(self, t, n, base_lr):
            return base_lr

    cases = {
        Undecorated: "decorate test_register_checks_the_schedule_contract.<locals>."
        "Undecorated @dataclass(frozen=True)",
        NoCurve: "implements neither decay() nor after_warmup()",
        Undocumented: "fields without a one-line doc: knob",
        dict: "'dict' is a class, not a subclass of schedulers.Schedule",
    }
    for cls, message in cases.items():
        with pytest.raises(ScheduleRegistryError, match=re.escape(message)):
            schedulers.register("contract_case")(cls)
    assert "contract_case" not in schedulers.available()


# ---------------------------------------------------------------- dotted paths


def test_dotted_path_loads_an_unregistered_schedule(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "my_halflife", PLUGIN_SOURCE)
    cls = schedulers.get("my_halflife:HalfLife")
    assert cls.__qualname__ == "HalfLife" and cls.name == "my_halflife:HalfLife"
    schedule = schedulers.from_table({"name": "my_halflife:HalfLife", "half_life": 5})
    assert schedule.lr(10, 100, 1.0) == 0.25
    assert "my_halflife:HalfLife" not in schedulers.available()  # loaded, not registered
    state = schedulers.schedule_state(schedule, 100, 10, [1.0], [0.25])
    assert schedulers.schedule_from_state(state) == schedule


NOT_A_SCHEDULE = "not a subclass of schedulers.Schedule"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_pkg_xyz.sub:Cls", "module 'no_such_pkg_xyz.sub' not found; is its package"),
        ("schedulers.nope_xyz:Cls", "module 'schedulers.nope_xyz' not found"),
        ("schedulers.cosine:Cosin", "has no attribute 'Cosin'; did you mean 'Cosine'?"),
        ("schedulers.cosine:math", f"'math' is a module, {NOT_A_SCHEDULE}"),
        ("json:dumps", f"'dumps' is a function, {NOT_A_SCHEDULE}"),
        ("json:JSONDecoder", f"'JSONDecoder' is a class, {NOT_A_SCHEDULE}"),
        ("schedulers.base:DecaySchedule", "implements neither decay() nor after_warmup()"),
        (":Cls", "expected 'package.module:ClassName', one colon"),
        ("a:b:c", "expected 'package.module:ClassName', one colon"),
    ],
)
def test_bad_dotted_paths_say_what_failed(path, message):
    with pytest.raises(ScheduleRegistryError) as err:
        schedulers.get(path)
    assert str(err.value).startswith(f"LR schedule {path!r}: ")
    assert message in str(err.value)


def test_dotted_path_to_a_module_that_fails_to_import(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "needs_missing_dep", "import not_installed_dep_xyz\n")
    with pytest.raises(ScheduleRegistryError) as err:
        schedulers.get("needs_missing_dep:Cls")
    assert str(err.value) == (
        "LR schedule 'needs_missing_dep:Cls': importing module 'needs_missing_dep' failed: "
        "No module named 'not_installed_dep_xyz'"
    )
    write_module(tmp_path, monkeypatch, "raises_on_import", "raise RuntimeError('boom')\n")
    with pytest.raises(ScheduleRegistryError, match="raised RuntimeError: boom"):
        schedulers.get("raises_on_import:Cls")


# ---------------------------------------------------------------- entry points


def test_plugin_through_a_real_entry_point(tmp_path, monkeypatch, registry_snapshot):
    install_plugin(
        tmp_path, monkeypatch, "myplug", "myplug",
        """
        [sdlora.lr_schedulers]
        myplug_halflife = myplug:HalfLife
        """,
    )  # fmt: skip
    # importlib.metadata really sees it: this is what pip's dist-info gives a real install.
    (ep,) = importlib.metadata.entry_points(group="sdlora.lr_schedulers", name="myplug_halflife")
    assert ep.dist.name == "myplug"
    assert "myplug" not in sys.modules  # listed, not imported, until asked for
    assert "myplug_halflife" in schedulers.available()
    assert "myplug" not in sys.modules
    cls = schedulers.get("myplug_halflife")
    assert cls.__module__ == "myplug" and cls.name == "myplug_halflife"
    schedule = schedulers.from_table({"name": "myplug_halflife", "half_life": 4})
    assert schedule.lr(8, 100, 1.0) == 0.25
    assert schedulers.schedule_state(schedule, 100, 0, [1.0], [1.0])["name"] == "myplug_halflife"
    assert "half_life (int, default 10): Updates per halving" in schedulers.describe(
        "myplug_halflife"
    )


def test_entry_point_plugins_do_not_leak_between_tests():
    assert "myplug_halflife" not in schedulers.available()


def test_broken_entry_point_names_itself(tmp_path, monkeypatch, registry_snapshot):
    install_plugin(
        tmp_path, monkeypatch, "brokenplug", "brokenplug",
        """
        [sdlora.lr_schedulers]
        broken_one = brokenplug.missing:Nope
        wrong_attr = brokenplug:Nope
        """,
    )  # fmt: skip
    assert {"broken_one", "wrong_attr"} <= set(schedulers.available())  # listing stays cheap
    with pytest.raises(ScheduleRegistryError) as err:
        schedulers.get("broken_one")
    assert str(err.value) == (
        "LR schedule plug-in 'broken_one' (entry point 'broken_one = brokenplug.missing:Nope' in "
        "group sdlora.lr_schedulers, distribution brokenplug 0.1) failed to load: "
        "ModuleNotFoundError: No module named 'brokenplug.missing'"
    )
    with pytest.raises(
        ScheduleRegistryError, match=r"'wrong_attr' .* failed to load: AttributeError"
    ):
        schedulers.get("wrong_attr")
    assert schedulers.get("cosine").name == "cosine"  # other names still work


def test_entry_point_that_is_not_a_schedule(tmp_path, monkeypatch, registry_snapshot):
    install_plugin(
        tmp_path, monkeypatch, "notaplug", "notaplug",
        """
        [sdlora.lr_schedulers]
        not_a_schedule = notaplug:helper
        """,
        source="def helper():\n    return 1\n",
    )  # fmt: skip
    with pytest.raises(ScheduleRegistryError, match="is a function, not a subclass"):
        schedulers.get("not_a_schedule")


def test_entry_point_reusing_a_builtin_name_is_refused(tmp_path, monkeypatch, registry_snapshot):
    install_plugin(
        tmp_path, monkeypatch, "clashplug", "clashplug",
        """
        [sdlora.lr_schedulers]
        cosine = clashplug:HalfLife
        """,
    )  # fmt: skip
    with pytest.raises(ScheduleRegistryError) as err:
        schedulers.get("cosine")
    assert str(err.value) == (
        "LR schedule name 'cosine' is defined twice: by schedulers.cosine:Cosine and by the entry "
        "point clashplug:HalfLife (distribution clashplug 0.1); a plug-in cannot reuse a taken name"
    )


def test_plugin_registering_itself_under_its_entry_point_name(
    tmp_path, monkeypatch, registry_snapshot
):
    source = PLUGIN_SOURCE.replace(
        "from schedulers.fields import doc\n",
        "from schedulers.fields import doc\nfrom schedulers import register\n",
    ).replace(
        "@dataclass(frozen=True)\nclass", '@register("selfreg")\n@dataclass(frozen=True)\nclass'
    )
    install_plugin(
        tmp_path, monkeypatch, "selfreg", "selfreg",
        """
        [sdlora.lr_schedulers]
        selfreg = selfreg:HalfLife
        """,
        source=source,
    )  # fmt: skip
    assert schedulers.get("selfreg").name == "selfreg"
    assert schedulers.get("selfreg") is sys.modules["selfreg"].HalfLife


def test_reimport_of_the_same_class_is_not_a_duplicate(registry_snapshot):
    cls = schedulers.get("cosine")
    twin = dataclasses.make_dataclass(
        "Cosine", [], bases=(cls,), frozen=True, namespace={"__module__": "schedulers.cosine"}
    )
    twin.__qualname__ = "Cosine"
    schedulers.register("cosine")(twin)  # what importlib.reload(schedulers.cosine) does
    assert schedulers.get("cosine") is twin


def test_fields_doc_turns_list_defaults_into_tuples():
    field = doc("Milestones", [1, 2])
    assert field.default == (1, 2) and field.metadata == {"doc": "Milestones"}
