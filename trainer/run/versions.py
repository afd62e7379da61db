"""The installed libraries against the ranges sdlora declares, checked before any model loads.

A set of libraries that does not fit our ranges fails in ways that point elsewhere: a peft
too old for the installed transformers once surfaced as a complaint about
``lora.text_encoder_target_modules``. This check names the packages, their versions and the
command that installs the tested set, and blames no config key.
"""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement

from trainer.errors import UserError

DISTRIBUTION = "sdlora"
FIX = (
    "install the tested set: pip install -c requirements/cpu.lock -e . "
    "(requirements/cuda.lock on a CUDA machine; see requirements/README.md)"
)


class IncompatibleEnvironment(UserError):
    """Installed packages outside the ranges sdlora declares."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"the installed packages do not fit sdlora's ranges:\n{lines}\n{FIX}")


def problems() -> list[str]:
    """One line per core requirement that is missing or outside its range.

    Extras are not checked here: each feature that needs one says so when it is configured.
    A source tree that was never installed has no metadata to check against, and passes.
    """
    try:
        declared = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    found = []
    for text in declared:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement, or one for another platform
        wanted = f"{requirement.name}{requirement.specifier}"
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            found.append(f"{requirement.name} is not installed; sdlora needs {wanted}")
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            found.append(f"{requirement.name} {version} is installed; sdlora needs {wanted}")
    return found


def check() -> None:
    """Raise :class:`IncompatibleEnvironment` naming every package out of range."""
    found = problems()
    if found:
        raise IncompatibleEnvironment(found)
