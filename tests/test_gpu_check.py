"""scripts/gpu_check.sh and its helpers: the one prepared command a GPU loan runs.

The dry run is the script end to end on the CPU with tiny shapes, every step, as CI and a
developer check it before a loan. Its figures mean nothing; what is checked is that every
step ran, that the report is derived from what the steps measured (the peak the peak step
measured, the ratios from the runs), that what comes back fits the device tool's limits, and
that a step past its limit is cut off while the others still run and the report is written.
No test asserts a wall-clock value.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import bench_gpu
import gpu_check_report
import gpu_env
import gpu_wheels
import pytest
from bench_matrix import Variant, matrix, parse_variant
from bench_report import against_plain, compare
from packaging.requirements import Requirement
from test_bench_gpu import FAKE_PEER

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = ["env", "pytest", "peak", "sd15", "extras", "sdxl"]
# What the device tool brings back from $OUT: at most 8 files, names of these characters.
RETURNED = {"bench_gpu.md", "bench_gpu.json", "pytest.log", "gpu_check.log", "bench_logs.tar.gz"}


def check(out: Path, *args: str, work: Path | None = None) -> subprocess.CompletedProcess:
    """The dry run, its work folder beside ``out`` unless given (not a new /tmp folder)."""
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    work = work or out.parent / "work"
    cmd = ["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(work), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    base = tmp_path_factory.mktemp("gpu_check")
    peer = base / "peer" / "train_text_to_image_lora.py"
    peer.parent.mkdir()
    peer.write_text(FAKE_PEER)
    (base / "wheels").mkdir()  # no wheels: CI's case
    out, work = base / "out", base / "work"
    done = check(out, "--wheels", str(base / "wheels"), "--diffusers-script", str(peer), work=work)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return done, out, work


@pytest.mark.slow
def test_dry_run_runs_every_step_and_returns_what_the_device_tool_brings_back(dry_run):
    done, out, _ = dry_run
    assert {p.name for p in out.iterdir()} == RETURNED
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in out.iterdir())
    report = json.loads((out / "bench_gpu.json").read_text())
    steps = report["check"]["steps"]
    assert [s["step"] for s in steps] == STEPS
    assert all(s["result"] == "ok" and s["seconds"] >= 0 for s in steps), steps
    assert report["check"]["dry_run"] is True
    # The report on disk is the one the JSON describes, and the log ends with it.
    text = (out / "bench_gpu.md").read_text()
    assert text == gpu_check_report.to_markdown(report)
    assert done.stdout.rstrip().endswith(text.rstrip().splitlines()[-1])
    assert "no wheels in" in done.stdout and "xformers: not tried in a dry run" in done.stdout
    # pytest ran test_cuda.py, and on a machine without CUDA every test skipped.
    log = (out / "pytest.log").read_text()
    assert re.search(r"\b\d+ skipped\b", log) and "failed" not in log and "error" not in log


@pytest.mark.slow
def test_dry_run_measures_each_configuration_and_the_ratios_follow(dry_run):
    _, out, work = dry_run
    report = json.loads((out / "bench_gpu.json").read_text())
    sd15, sdxl = report["sd15"], report["sdxl"]
    names = [
        Variant(**{k: r[k] for k in Variant.__dataclass_fields__}).name() for r in sd15["runs"]
    ]
    assert names == [
        "ours-b1-cached-no-sdpa",
        "diffusers-b1-uncached-no-sdpa",
        "ours-b1-cached-no-sdpa-gc",
    ]
    assert [r["batch"] for r in sdxl["runs"]] == [1] and sdxl["meta"]["arch"] == "sdxl"
    for run in sd15["runs"] + sdxl["runs"]:
        assert "error" not in run, run
        assert run["s_per_update"] > 0 and run["mfu"] > 0 and run["peak_mem_mb"] > 0
    # One peak, measured by the peak step and reused by both models' benchmarks.
    peak = json.loads((work / "peak.json").read_text())
    assert sd15["peak"] == sdxl["peak"] == {k: peak[k] for k in sd15["peak"]}
    # The extras step reused the sd15 calibration rather than measuring again.
    extras = json.loads((work / "extras.json").read_text())
    assert (
        extras["flops_per_image"] == json.loads((work / "sd15.json").read_text())["flops_per_image"]
    )
    [pair] = sd15["comparisons"]
    ours, peer = sd15["runs"][0], sd15["runs"][1]
    assert pair["images_per_s_ratio"] == pytest.approx(ours["images_per_s"] / peer["images_per_s"])
    [option] = against_plain(sd15["runs"])
    assert option["options"] == "gc"
    assert option["images_per_s_ratio"] == pytest.approx(
        sd15["runs"][2]["images_per_s"] / ours["images_per_s"]
    )
    with tarfile.open(out / "bench_logs.tar.gz") as logs:
        kept = {Path(name).name for name in logs.getnames()}
    assert {f"{name}.log" for name in names} <= kept


@pytest.mark.slow
def test_dry_run_reports_the_versions_it_ran_with(dry_run):
    import torch

    _, out, _ = dry_run
    env = json.loads((out / "bench_gpu.json").read_text())["check"]["env"]
    found = {p["name"]: p for p in env["packages"]}
    assert found["torch"]["version"] == torch.__version__ == env["facts"]["torch"]
    assert (
        found["diffusers"]["lock"]
        == gpu_wheels.read_lock(REPO / "requirements/cpu.lock")["diffusers"]
    )


@pytest.mark.slow
def test_a_step_past_its_limit_is_cut_off_and_the_others_still_run(tmp_path):
    """sd15 cannot build, calibrate and train in 3 s: it is cut off, the step after it runs,
    the exit status says so, and the report of what finished is written."""
    done = check(tmp_path / "out", "--steps", "peak,sd15,pytest", "--limits", "sd15=3")
    assert done.returncode == 1
    report = json.loads((tmp_path / "out" / "bench_gpu.json").read_text())
    results = {s["step"]: s["result"] for s in report["check"]["steps"]}
    assert results == {"peak": "ok", "sd15": "cut off at 3 s", "pytest": "ok"}
    assert (
        report["sd15"] is None and "Not measured" in (tmp_path / "out" / "bench_gpu.md").read_text()
    )


@pytest.mark.slow
def test_steps_past_the_deadline_are_not_started(tmp_path):
    done = check(tmp_path / "out", "--deadline", "0")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "bench_gpu.json").read_text())
    assert [(s["step"], s["result"]) for s in report["check"]["steps"]] == [
        (step, "not run (out of time)") for step in STEPS
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "error: --out DIR is required"),
        (["--out", "OUT", "--steps", "env,train"], "error: --steps: unknown step train"),
        (["--out", "OUT", "--limits", "sd15=ten"], "error: --limits sd15=ten"),
        (["--out", "OUT", "--deadline", "8m"], "error: --deadline 8m"),
        (["--out", "OUT", "--diffusers-script", "nowhere.py"], "error: --diffusers-script"),
        (["--out", "OUT", "--bogus"], "error: unknown argument --bogus"),
    ],
)
def test_bad_arguments_are_refused_with_an_error_line(tmp_path, args, message):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith(message), done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- the run matrix


def _lists(**overrides) -> argparse.Namespace:
    lists = {
        "variants": None,
        "batch_sizes": [1, 4],
        "precisions": ["fp16", "bf16"],
        "attention": ["sdpa"],
        "checkpointing": ["off", "on"],
        "latents": ["cached", "uncached"],
        "compile": ["off"],
        "channels_last": ["off", "on"],
        "diffusers_script": Path("peer.py"),
    }
    return argparse.Namespace(**{**lists, **overrides})


def test_every_variant_name_reads_back_as_the_same_variant():
    runs = matrix(_lists(compile=["off", "on"], attention=["sdpa", "xformers"]))
    assert len({r.name() for r in runs}) == len(runs)
    for run in runs:
        assert parse_variant(run.name()) == run


def test_runs_come_in_pairs_ours_then_the_peer_at_the_same_settings():
    """A sitting cut short has whole comparisons: each peer run follows ours at its settings."""
    runs = matrix(_lists())
    key = ("batch", "precision", "attention", "checkpointing")
    assert len(runs) == 2 * 2 * 2 * (2 * 2 + 1)
    groups: list[list[Variant]] = []
    for run in runs:
        if groups and all(getattr(run, k) == getattr(groups[-1][0], k) for k in key):
            groups[-1].append(run)
        else:
            groups.append([run])
    assert len(groups) == 8
    for group in groups:
        assert [r.trainer for r in group] == ["ours"] * 4 + ["diffusers"]
    assert not any(r.trainer == "diffusers" for r in matrix(_lists(diffusers_script=None)))


def test_variants_name_exactly_the_runs_made():
    names = ["ours-b16-cached-fp16-sdpa-gc-compile", "diffusers-b4-uncached-bf16-xformers"]
    assert [r.name() for r in matrix(_lists(variants=names))] == names


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ours-b16-cached-fp16", "expected TRAINER-bBATCH"),
        ("theirs-b1-cached-fp16-sdpa", "trainer 'theirs'"),
        ("ours-16-cached-fp16-sdpa", "batch '16'"),
        ("ours-b0-cached-fp16-sdpa", "batch 'b0'"),
        ("ours-b1-cached-fp8-sdpa", "precision 'fp8'"),
        ("ours-b1-cached-fp16-flash", "attention 'flash'"),
        ("ours-b1-cached-fp16-sdpa-fast", "unknown flag(s) ['fast']"),
        ("diffusers-b1-cached-fp16-sdpa", "the diffusers script has no latent cache"),
        ("diffusers-b1-uncached-fp16-sdpa-compile", "the diffusers script has no latent cache"),
    ],
)
def test_a_bad_variant_name_says_which_part_is_wrong(name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_variant(name)


def test_bench_gpu_refuses_the_sd15_peer_on_sdxl_and_a_peer_run_without_its_script(
    tmp_path, capsys
):
    peer = tmp_path / "train_text_to_image_lora.py"
    peer.write_text("")
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--arch", "sdxl", "--diffusers-script", str(peer)])
    assert "trains SD 1.x models only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--variants", "diffusers-b1-uncached-fp16-sdpa"])
    assert "needs --diffusers-script" in capsys.readouterr().err


def test_runs_past_the_budget_are_listed_not_run_and_the_report_is_still_written(tmp_path):
    """With a calibration to reuse and no time left, no process starts: every run is listed
    as not run, in the JSON and the markdown."""
    model = tmp_path / "model"
    facts = {"device": "cpu", "cpu_count": 2, "torch": "2", "cuda": None, "diffusers": "0"}
    facts |= {"transformers": "5", "python": "3", "xformers": None}
    earlier = {
        "meta": {"model_path": str(model), "resolution": 64, "rank": 4, **facts},
        "peak": {"dtype": "bf16", "size": 256, "flop_per_s": 1e9},
        "flops_per_image": dict.fromkeys(
            ("unet_forward", "unet_backward", "unet_train", "vae_encode", "text_encode"), 1e6
        ),
    }
    (tmp_path / "cal.json").write_text(json.dumps(earlier))
    names = ["ours-b1-cached-no-sdpa", "ours-b2-cached-no-sdpa-gc"]
    args = ["--device", "cpu", "--model", str(model), "--work", str(tmp_path / "work")]
    args += ["--resolution", "64", "--images", "2", "--calibration", str(tmp_path / "cal.json")]
    args += ["--variants", *names, "--budget-s", "0", "--json", str(tmp_path / "r.json")]
    args += ["--markdown", str(tmp_path / "r.md")]
    bench_gpu.main(args)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["runs"] == [] and report["not_run"] == names
    assert report["peak"] == earlier["peak"]
    assert f"Not run (time budget spent): {', '.join(names)}." in (tmp_path / "r.md").read_text()


# ---------------------------------------------------------------- the report


def _run(trainer: str, batch: int, images_per_s: float, mem: float, **options) -> dict:
    return {
        "trainer": trainer, "batch": batch, "precision": "fp16", "attention": "sdpa",
        "checkpointing": False, "compile": False, "channels_last": False,
        "latents": "cached" if trainer == "ours" else "uncached",
        "images_per_s": images_per_s, "mfu": images_per_s / 100, "peak_mem_mb": mem,
        "s_per_update": batch / images_per_s, "startup_s": 5.0, **options,
    }  # fmt: skip


def _bench(runs: list[dict], command: str, not_run: tuple = ()) -> dict:
    return {
        "meta": {"command": command, "arch": "sd15"},
        "peak": {"flop_per_s": 1.0},
        "flops_per_image": {},
        "runs": runs,
        "not_run": list(not_run),
    }


def test_reports_of_one_sitting_merge_and_compare_across_files():
    """Our run in one step's file, the peer's in another: the merged report compares them."""
    first = _bench([_run("ours", 16, 30.0, 9000)], "sd15", not_run=("x",))
    second = _bench(
        [_run("diffusers", 16, 20.0, 10000), _run("ours", 16, 24.0, 6000, checkpointing=True)],
        "extras",
    )
    merged = gpu_check_report.merge([first, second])
    assert [r["images_per_s"] for r in merged["runs"]] == [30.0, 20.0, 24.0]
    assert merged["not_run"] == ["x"] and merged["meta"]["command"] == "sd15 ; extras"
    assert merged["comparisons"] == compare(merged["runs"])
    [pair] = merged["comparisons"]
    assert pair["images_per_s_ratio"] == pytest.approx(1.5)
    assert pair["peak_mem_ratio"] == pytest.approx(0.9)
    [option] = against_plain(merged["runs"])
    assert option["images_per_s_ratio"] == pytest.approx(0.8)
    assert option["peak_mem_ratio"] == pytest.approx(6000 / 9000)


def test_the_report_is_written_from_whatever_steps_finished(tmp_path):
    (tmp_path / "steps.tsv").write_text("env\tok\t7\t60\nsd15\tcut off at 300 s\t300\t300\n")
    report = gpu_check_report.build(tmp_path)
    assert report["sd15"] is None and report["sdxl"] is None
    assert report["check"]["steps"] == [
        {"step": "env", "result": "ok", "seconds": 7, "limit_s": 60},
        {"step": "sd15", "result": "cut off at 300 s", "seconds": 300, "limit_s": 300},
    ]
    text = gpu_check_report.to_markdown(report)
    assert "| sd15 | cut off at 300 s | 300 | 300 |" in text
    assert text.count("Not measured in this check.") == 2
    assert gpu_check_report.build(tmp_path / "nothing")["check"]["steps"] == []


def test_a_rerun_of_some_steps_names_the_results_an_earlier_call_left(tmp_path):
    """A rerun of extras,sdxl keeps the sd15 report (and env) of the first call, and says so."""
    (tmp_path / "check.json").write_text(json.dumps({"steps_asked": "extras,sdxl"}))
    (tmp_path / "sd15.json").write_text(json.dumps(_bench([_run("ours", 1, 5.0, 900)], "sd15")))
    (tmp_path / "extras.json").write_text(json.dumps(_bench([], "extras")))
    report = gpu_check_report.build(tmp_path)
    assert report["check"]["earlier"] == ["sd15"]
    assert [r["images_per_s"] for r in report["sd15"]["runs"]] == [5.0]


# ---------------------------------------------------------------- wheels and versions


def test_the_lock_is_read_as_packaging_reads_each_pin():
    lock = REPO / "requirements" / "cuda.lock"
    expected = {}
    for line in lock.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            req = Requirement(line)
            [spec] = req.specifier
            expected[gpu_wheels.canonical(req.name)] = spec.version
    assert gpu_wheels.read_lock(lock) == expected


def test_the_wheels_are_the_locks_versions_one_of_each():
    lock = gpu_wheels.read_lock(REPO / "requirements" / "cuda.lock")
    plan = gpu_wheels.plan(lock)
    assert {n: lock[n] for n in gpu_wheels.FROM_LOCK} == {
        n: v for n, v in plan["main"].items() if n in gpu_wheels.FROM_LOCK
    }
    # What is pinned outside the lock must not disagree with it if it enters the lock.
    for name, version in {**gpu_wheels.PEER, **gpu_wheels.XFORMERS}.items():
        assert lock.get(name, version) == version, name
    # torch is never carried (a multi-GB build): the check runs the machine's.
    assert "torch" not in plan["main"] and "torch" not in plan["xformers"]
    with pytest.raises(SystemExit, match="diffusers not pinned"):
        gpu_wheels.plan({k: v for k, v in lock.items() if k != "diffusers"})


def test_one_version_of_each_wheel_is_kept(tmp_path):
    for name in (
        "diffusers-0.41.0-py3-none-any.whl",
        "diffusers-0.42.1-py3-none-any.whl",
        "SQLAlchemy-2.1.9-cp312-cp312-manylinux_2_28_x86_64.whl",
        "sqlalchemy-2.1.8-cp312-cp312-manylinux_2_28_x86_64.whl",
    ):
        (tmp_path / name).write_bytes(b"")
    assert len(gpu_wheels.duplicates(tmp_path)) == 2
    gpu_wheels.prune(tmp_path, {"diffusers": "0.42.1", "sqlalchemy": "2.1.9"})
    assert gpu_wheels.duplicates(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "SQLAlchemy-2.1.9-cp312-cp312-manylinux_2_28_x86_64.whl",
        "diffusers-0.42.1-py3-none-any.whl",
    ]
    with pytest.raises(SystemExit, match="two versions of one package"):
        (tmp_path / "diffusers-0.40.0-py3-none-any.whl").write_bytes(b"")
        gpu_env.install(tmp_path, tmp_path / "site")


@pytest.mark.slow
def test_versions_are_the_installed_ones_as_pip_lists_them():
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pip = {gpu_wheels.canonical(p["name"]): p["version"] for p in json.loads(listed)}
    rows = gpu_env.versions()
    assert [r["name"] for r in rows][:3] == ["torch", "diffusers", "peft"]
    for row in rows:
        assert row["version"] == pip.get(row["name"]), row["name"]


def test_a_version_outside_sdlora_range_is_flagged():
    row = {"name": "torch", "version": "2.11.0+cu130", "lock": "2.14.1", "range": "<2.15,>=2.13"}
    assert gpu_env._status(row) == "OUTSIDE sdlora's range <2.15,>=2.13"
    assert gpu_env._status({**row, "version": "2.14.1"}) == "= lock"
    assert gpu_env._status({**row, "version": "2.13.0"}) == "lock has 2.14.1"
    assert gpu_env._status({**row, "range": None, "lock": None}) == "not in the lock"


def test_an_unmet_requirement_of_a_carried_package_is_named(monkeypatch):
    """Wheels go in with --no-deps, so nothing else checks what they need."""
    real = gpu_env.metadata.version

    def older(name: str) -> str:
        return "0.1.0" if gpu_wheels.canonical(name) == "huggingface-hub" else real(name)

    monkeypatch.setattr(gpu_env.metadata, "version", older)
    problems = gpu_env.unmet()
    assert any(p.startswith("diffusers needs huggingface-hub") for p in problems), problems
    assert all(p.endswith("0.1.0 is installed") for p in problems if "huggingface" in p)
