"""A registry of typed tables chosen by name: built-ins, entry-point plug-ins, and
``"package.module:Class"`` paths.

One :class:`Registry` per kind of table (``schedulers/registry.py`` holds the LR schedules',
``trainer/optimizers/registry.py`` the optimizers'):

- built-ins register themselves with ``@registry.register("name")`` when their package is
  imported;
- third-party packages declare an entry point in the kind's group (``name =
  "their_pkg.mod:Class"``); the group is read on the first lookup, and a plug-in module is only
  imported when its name is asked for;
- any importable class can be named by its path, ``name = "their_pkg.mod:Class"``.

Lookups fail loudly and never return ``None``: an unknown name lists what exists and suggests
the closest; a duplicate name names both definitions; a broken plug-in says what failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import importlib.metadata
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeGuard, TypeVar

from typedtables.fields import field_types
from typedtables.tables import NamedTable, build_table

# The classes one registry holds: a base class and its subclasses, dataclasses with a `name`.
T = TypeVar("T", bound="type[NamedTable]")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RegistryError(ValueError):
    """A class cannot be registered or loaded: a duplicate name or a broken plug-in."""


class UnknownNameError(KeyError):
    """No class is registered under the name asked for.

    A ``KeyError`` (a failed lookup) whose ``str()`` is the plain message, not its repr.
    """

    def __init__(
        self, kind: str, name: str, available: Sequence[str], suggestion: str | None
    ) -> None:
        self.kind = kind
        self.name = name
        self.available = list(available)
        self.suggestion = suggestion
        super().__init__(name)

    def __reduce__(self) -> tuple:
        # Rebuild from every argument, so the error survives pickling across processes.
        return type(self), (self.kind, self.name, self.available, self.suggestion)

    def __str__(self) -> str:
        hint = f"; did you mean {self.suggestion!r}?" if self.suggestion else ""
        return (
            f"unknown {self.kind} {self.name!r}{hint} Available: {', '.join(self.available)} "
            '(or a plug-in class written as "package.module:ClassName")'
        )


def origin(cls: type) -> str:
    """Where a class is defined, as ``module:QualName``."""
    return f"{cls.__module__}:{cls.__qualname__}"


class Registry(Generic[T]):
    """Classes of one kind by name.

    Args:
        kind: What is registered, for messages (``"optimizer"``).
        base: The base class every registered class must subclass.
        group: The entry-point group plug-ins declare themselves in.
        check: Extra contract checks, ``check(cls, what)`` raising :class:`RegistryError`.
        base_name: How messages name ``base`` (default: its module and qualified name).

    Every registered class is a ``@dataclass(frozen=True)`` subclass of ``base`` with a
    one-line doc on every field, no field called ``name`` (the registry sets the class
    attribute ``name``), and passes ``check``.
    """

    def __init__(
        self,
        kind: str,
        base: T,
        group: str,
        check: Callable[[T, str], None] | None = None,
        base_name: str = "",
    ) -> None:
        self.kind = kind
        self.base = base
        self.base_name = base_name or f"{base.__module__}.{base.__qualname__}"
        self.group = group
        self._check = check
        self._classes: dict[str, T] = {}
        self._entry_points: dict[str, importlib.metadata.EntryPoint] | None = None

    # ------------------------------------------------------------------ registering

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator registering a class under ``name`` (letters, digits, ``_ . -``).

        Raises:
            RegistryError: The name is malformed or taken by another class, or the class
                breaks the contract.
        """
        if not isinstance(name, str) or not _NAME.match(name):
            raise RegistryError(
                f"{self.kind} name {name!r}: use letters, digits, '_', '.' or '-' "
                "(':' is reserved for 'package.module:Class' paths)"
            )

        def decorate(cls: T) -> T:
            self.check_class(cls, f"@register({name!r}) on {origin(cls)}")
            self._add(name, cls)
            return cls

        return decorate

    def _add(self, name: str, cls: T) -> None:
        existing = self._classes.get(name)
        # The same module:qualname again is a re-import (importlib.reload), not a clash.
        if existing is not None and origin(existing) != origin(cls):
            raise RegistryError(
                f"{self.kind} name {name!r} is defined twice: by {origin(existing)} and by "
                f"{origin(cls)}; rename one of them"
            )
        self._classes[name] = cls
        if getattr(cls, "name", "") in ("", origin(cls)):
            cls.name = name

    def _of_kind(self, obj: object) -> TypeGuard[T]:
        """Whether ``obj`` is ``base`` or one of its subclasses: what ``T`` stands for."""
        return isinstance(obj, type) and issubclass(obj, self.base)

    def check_class(self, obj: object, what: str) -> T:
        """``obj``, once it honours the contract (see the class).

        Raises:
            RegistryError: It does not.
        """
        if not self._of_kind(obj):
            # A module's repr holds its absolute path; its name says the same.
            shown = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
            kind = "class" if isinstance(obj, type) else type(obj).__name__
            raise RegistryError(
                f"{what}: {shown or repr(obj)!r} is a {kind}, not a subclass of {self.base_name}"
            )
        # An undecorated subclass inherits __dataclass_params__, so look at the class itself.
        params = vars(obj).get("__dataclass_params__")
        if params is None or not params.frozen:
            raise RegistryError(f"{what}: decorate {obj.__qualname__} @dataclass(frozen=True)")
        fields = dataclasses.fields(obj)
        undocumented = [f.name for f in fields if not f.metadata.get("doc")]
        if undocumented:
            raise RegistryError(
                f"{what}: fields without a one-line doc: {', '.join(undocumented)}; declare "
                "them with typedtables.doc(text, default)"
            )
        if "name" in {f.name for f in fields}:
            raise RegistryError(f"{what}: 'name' is reserved for the {self.kind}'s name")
        if self._check is not None:
            self._check(obj, what)
        return obj

    # ------------------------------------------------------------------ looking up

    def get(self, name: str) -> T:
        """The class for a registered name, an entry-point name, or a ``"pkg.mod:Class"`` path.

        Raises:
            UnknownNameError: Nothing has that name.
            RegistryError: A plug-in or path failed to load, or two plug-ins clash.
        """
        if not isinstance(name, str) or not name:
            raise UnknownNameError(self.kind, repr(name), self.available(), None)
        if ":" in name:
            return self.load_path(name)
        entry_points = self._scan_entry_points()
        if name in self._classes:
            return self._classes[name]
        if name in entry_points:
            return self._load_entry_point(entry_points[name])
        names = self.available()
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        raise UnknownNameError(self.kind, name, names, close[0] if close else None)

    def available(self) -> list[str]:
        """Every name: built-ins, registered plug-ins and entry points, sorted."""
        return sorted(set(self._classes) | set(self._scan_entry_points()))

    def loaded(self) -> dict[str, T]:
        """The classes registered so far, by name (no plug-in is imported to list them)."""
        return dict(self._classes)

    def refresh_entry_points(self) -> None:
        """Forget the entry points read so far; the next lookup reads them again."""
        self._entry_points = None

    def _scan_entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        if self._entry_points is not None:
            return self._entry_points
        found: dict[str, importlib.metadata.EntryPoint] = {}
        for ep in importlib.metadata.entry_points(group=self.group):
            other = found.get(ep.name)
            if other is not None and other.value != ep.value:
                raise RegistryError(
                    f"{self.kind} name {ep.name!r} is defined twice in the entry-point group "
                    f"{self.group}: {other.value} ({_dist(other)}) and {ep.value} ({_dist(ep)}); "
                    "uninstall one of them"
                )
            known = self._classes.get(ep.name)
            if known is not None and origin(known) != ep.value:
                raise RegistryError(
                    f"{self.kind} name {ep.name!r} is defined twice: by {origin(known)} and by "
                    f"the entry point {ep.value} ({_dist(ep)}); a plug-in cannot reuse a taken "
                    "name"
                )
            found[ep.name] = ep
        self._entry_points = found
        return found

    def _load_entry_point(self, ep: importlib.metadata.EntryPoint) -> T:
        what = (
            f"{self.kind} plug-in {ep.name!r} (entry point '{ep.name} = {ep.value}' in group "
            f"{self.group}, {_dist(ep)})"
        )
        try:
            obj = ep.load()
        except Exception as err:
            raise RegistryError(f"{what} failed to load: {type(err).__name__}: {err}") from err
        self.check_class(obj, what)
        self._add(ep.name, obj)
        return obj

    def load_path(self, path: str) -> T:
        """Import a class from ``"package.module:ClassName"`` (not registered).

        Raises:
            RegistryError: The path is malformed, the module is missing or fails to import,
                the attribute is missing, or the class breaks the contract.
        """
        module_name, _, attr = path.partition(":")
        what = f"{self.kind} {path!r}"
        if not module_name or not attr or ":" in attr:
            raise RegistryError(f"{what}: expected 'package.module:ClassName', one colon")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # "No such module" is not "a module that imports something missing".
            if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
                raise RegistryError(
                    f"{what}: module {module_name!r} not found; is its package installed, or "
                    "its folder on PYTHONPATH?"
                ) from err
            raise RegistryError(f"{what}: importing module {module_name!r} failed: {err}") from err
        except Exception as err:
            raise RegistryError(
                f"{what}: importing module {module_name!r} raised {type(err).__name__}: {err}"
            ) from err
        obj: object = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                classes = [
                    k
                    for k, v in vars(module).items()
                    if isinstance(v, type) and issubclass(v, self.base)
                ]
                close = difflib.get_close_matches(part, classes, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise RegistryError(
                    f"{what}: module {module_name!r} has no attribute {attr!r}{hint}"
                )
            obj = getattr(obj, part)
        return self.check_class(obj, what)

    # ------------------------------------------------------------------ tables

    def build(
        self,
        table: Any,
        where: str,
        problems: list[str],
        *,
        noun: str,
        default: str | None,
        fallback: str,
        hints: Mapping[str, str] = {},
        peer_names: Mapping[str, str] = {},
    ) -> Any:
        """Build the table ``{"name": ..., <that class's fields>}``, appending every problem
        to ``problems`` instead of raising (a caller reports a whole config at once).

        Args:
            table: The TOML data.
            where: Its TOML path (``optimizer``), to name keys in messages.
            noun: What one class is called in messages (``"schedule"``).
            default: The name when the table has none; ``None``: the name is required.
            fallback: The name built when the name is bad: without the class there is no
                schema to check the other keys against.
            hints: Keys that belong elsewhere, with where (``{"max_grad_norm": "..."}``).
            peer_names: Other trainers' names for our keys (``{"eta_min": "min_lr"}``).
        """
        if not isinstance(table, Mapping):
            problems.append(f"[{where}]: expected a table, got {type(table).__name__}")
            return self.get(fallback)()
        name = table.get("name", default)
        if name is None:
            problems.append(f"{where}.name: required; one of {', '.join(self.available())}")
            return self.get(fallback)()
        if not isinstance(name, str):
            article = "an" if noun[0] in "aeiou" else "a"
            problems.append(
                f"{where}.name: expected {article} {noun} name (str), got "
                f"{type(name).__name__} {name!r}"
            )
            return self.get(fallback)()
        try:
            cls = self.get(name)
        except (UnknownNameError, RegistryError) as err:
            problems.append(f"{where}.name: {err}")
            return self.get(fallback)()

        def unknown(_: type, key: str, where: str) -> str:  # build_table passes `cls` back
            return self.unknown_key(cls, key, where, noun, hints, peer_names)

        return build_table(cls, table, where, problems, unknown=unknown, skip=("name",))

    def unknown_key(
        self,
        cls: T,
        key: str,
        where: str,
        noun: str,
        hints: Mapping[str, str],
        peer_names: Mapping[str, str],
    ) -> str:
        """The message for a key ``cls`` does not have, with the most useful hint found: our
        name for a peer's key, where the key lives instead, the closest key, the classes
        that have it (only those loaded: a hint must not import every plug-in), or the keys."""
        keys = list(field_types(cls))
        message = f"{where}.{key}: unknown key for the {cls.name!r} {noun}"
        peer = peer_names.get(key)
        if peer in keys:
            return f"{message}; sdlora calls it {where}.{peer}"
        if key in hints:
            return f"{message}; {hints[key]}"
        close = difflib.get_close_matches(key, keys, n=1)
        if close:
            return f"{message}; did you mean {where}.{close[0]}?"
        owners = [n for n, c in sorted(self._classes.items()) if key in field_types(c)]
        if owners:
            # Typically `--set <where>.name=...` over a table written for another class.
            return (
                f"{message}; it is a key of: {', '.join(owners)}. To switch, replace the whole "
                f"table, e.g. --set '{where}={{name = \"{cls.name}\"}}'"
            )
        return f"{message}; its keys are: name, {', '.join(keys)}"

    @contextlib.contextmanager
    def isolated(self) -> Iterator[None]:
        """Test helper: undo every registration and entry-point scan made inside the block."""
        saved = dict(self._classes)
        names = {cls: cls.name for cls in saved.values()}
        saved_eps = self._entry_points
        try:
            yield
        finally:
            self._classes.clear()
            self._classes.update(saved)
            for cls, name in names.items():
                cls.name = name
            self._entry_points = saved_eps


def _dist(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return (
        f"distribution {dist.name} {dist.version}" if dist is not None else "unknown distribution"
    )
