"""The shipped accelerate launch configs (docker/accelerate/*.yaml) read as accelerate reads
them, and nothing in the repository points at their old paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "docker" / "accelerate"

# file: (distributed type, machines, processes, mixed precision)
EXPECTED = {
    "1gpu.yaml": (DistributedType.NO, 1, 1, "fp16"),
    "multigpu.yaml": (DistributedType.MULTI_GPU, 1, 8, "fp16"),
    "multinode.yaml": (DistributedType.MULTI_GPU, 2, 16, "fp16"),
    "cpu2.yaml": (DistributedType.MULTI_GPU, 1, 2, "no"),
}


def test_the_four_configs_are_there():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate(name):
    config = load_config_from_file(str(CONFIGS / name))
    kind, machines, processes, precision = EXPECTED[name]
    assert config.distributed_type == kind
    assert (config.num_machines, config.num_processes) == (machines, processes)
    assert config.mixed_precision == precision
    # The usage line at the top launches this very file.
    assert f"docker/accelerate/{name}" in (CONFIGS / name).read_text()


def test_multinode_example_names_a_reachable_main_process():
    config = load_config_from_file(str(CONFIGS / "multinode.yaml"))
    assert config.num_processes % config.num_machines == 0
    assert config.machine_rank == 0 and config.main_process_ip and config.main_process_port
    assert config.rdzv_backend == "static"


def test_nothing_points_at_the_old_config_paths():
    old = "docker/" + "accelerate-"  # spelled in two parts so this file does not match itself
    skip = {".venv", ".git", "tiny", "output", "outputs", "runs", "build"}
    stale = []
    for path in REPO.rglob("*"):
        if skip & set(path.relative_to(REPO).parts) or not path.is_file():
            continue
        text_file = path.suffix in {".py", ".md", ".yaml", ".toml", ".cfg"}
        if (text_file or path.name in {"Makefile", "Dockerfile"}) and old in path.read_text(
            errors="replace"
        ):
            stale.append(str(path.relative_to(REPO)))
    assert stale == []
