"""Sweeps end to end: real worker processes on the tiny model, journal and PostgreSQL storage,
a worker killed mid-trial, the report in a real browser.

Every sweep here is the same 3-trial grid over three LR schedules, so each one is compared
with the uninterrupted single-worker sweep, run once per module, to the bit.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from helpers import without_clock
from sweep_helpers import (
    chromium,
    need,
    postgres_bindir,
    run_sweep,
    start,
    summary,
    sweep_command,
    write_sweep,
)

from trainer.commands import cli
from trainer.lora.files import WEIGHTS_NAME
from trainer.report.tracking import read_metrics
from trainer.run.checkpoint import find_latest
from trainer.sweep import claims
from trainer.sweep.report import FIGURES, FILES

pytestmark = pytest.mark.slow
VALUE_COLUMNS = ("state", "final_val_loss", "best_val_loss", "final_train_loss", "updates")


@pytest.fixture(scope="module")
def sweep_file(tiny_model, tiny_data, tmp_path_factory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("sweep"), tiny_model, tiny_data)


@pytest.fixture(scope="module")
def reference(sweep_file, tmp_path_factory) -> Path:
    """The sweep run once, uninterrupted, by one worker."""
    out = tmp_path_factory.mktemp("reference") / "sweep"
    run_sweep(sweep_command(sweep_file, out), out.parent / "worker.log")
    return out


def run_folders(out: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((out / "trials").iterdir())}


def assert_same_results(out: Path, reference: Path) -> None:
    """The same runs in the same folders, with bitwise the same losses and LRs."""
    mine, ref = run_folders(out), run_folders(reference)
    assert mine.keys() == ref.keys()
    for name in ref:
        # The clock (time, elapsed) differs between two runs; everything else must not.
        a, b = without_clock(read_metrics(mine[name])), without_clock(read_metrics(ref[name]))
        assert a == b, f"{name}: metrics.jsonl differs from the uninterrupted sweep"
    rows, ref_rows = summary(out), summary(reference)
    assert rows.keys() == ref_rows.keys()
    for key, row in rows.items():
        assert [row[c] for c in VALUE_COLUMNS] == [ref_rows[key][c] for c in VALUE_COLUMNS]


def trained_once(folder: Path) -> bool:
    """The run's log shows one training to the end, and no second start of it."""
    log = (folder / "train.log").read_text()
    return log.count("done: ") == 1 and "nothing to train" not in log


def test_three_schedules_complete_offline_with_every_report_file(reference):
    rows = summary(reference)
    assert sorted(trial for trial, _ in rows) == sorted(
        [
            "constant",
            "cosine(warmup_steps=2, min_lr_ratio=0.1)",
            "cosine_with_restarts(num_cycles=2)",
        ]
    )
    assert all(r["state"] == "complete" and r["updates"] == "8" for r in rows.values())
    for name in FILES:
        assert (reference / name).stat().st_size > 0, name
    for folder in run_folders(reference).values():
        final = read_metrics(folder)[-1]
        assert trained_once(folder)
        row = next(r for r in rows.values() if r["folder"] == str(folder))
        assert float(row["final_val_loss"]) == pytest.approx(final["val_loss"], rel=1e-5)


def test_each_trials_lrs_equal_lr_plot_of_its_config(reference, tmp_path):
    """The LR every update applied (metrics.jsonl) is what `sdlora lr-plot` computes for the
    trial's own config, read back from the trial's folder."""
    for name, folder in run_folders(reference).items():
        csv_path = tmp_path / f"{name}.csv"
        assert (
            cli.main(["lr-plot", "--config", str(folder / "config.toml"), "--csv", str(csv_path)])
            == 0
        )
        lines = csv_path.read_text().splitlines()[1:]
        expected = [[float(x) for x in line.split(",")[1:]] for line in lines]
        applied = [r["lr"] for r in read_metrics(folder)]
        assert applied == expected, name
    schedules = {read_metrics(f)[3]["lr"][0] for f in run_folders(reference).values()}
    assert len(schedules) == 3, "three schedules, three different LRs at update 4"


def test_worker_killed_mid_trial_then_rerun_matches_uninterrupted(sweep_file, reference, tmp_path):
    """With a process per trial (warm_workers = false: a killed warm worker is in
    test_sweep_warm.py), against the reference's warm trials."""
    out = tmp_path / "sweep"
    cold = tmp_path / "cold.toml"
    text = sweep_file.read_text().replace(
        'base = "base.toml"', f'base = "{sweep_file.parent}/base.toml"'
    )
    cold.write_text("warm_workers = false\n" + text)
    sweep_file = cold
    worker = start(sweep_command(sweep_file, out), tmp_path / "killed.log")
    deadline = time.monotonic() + 300
    victim = None
    while time.monotonic() < deadline and worker.poll() is None and victim is None:
        for folder in (out / "trials").glob("*") if (out / "trials").is_dir() else []:
            if find_latest(folder) is not None:
                victim = folder
                break
        time.sleep(0.01)
    assert victim is not None, (tmp_path / "killed.log").read_text()[-3000:]
    # A machine losing power: the worker and the training processes it started, all at once.
    pids = (out / "locks" / f"{victim.name}.pids").read_text().split()
    groups = {os.getpgid(int(pid)) for pid in pids if _alive(int(pid))}
    os.killpg(worker.pid, signal.SIGKILL)
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    worker.wait()
    assert not (victim / "manifest.json").exists(), "the run finished before the kill landed"
    killed_at = find_latest(victim)

    run_sweep(sweep_command(sweep_file, out), tmp_path / "rerun.log")
    log = (victim / "train.log").read_text()
    assert f"resuming at {int(killed_at.name.split('-')[1])}" in log, log[-3000:]
    assert "its worker is gone" in (tmp_path / "rerun.log").read_text()
    assert_same_results(out, reference)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def two_workers(sweep_file: Path, out: Path, logs: Path, *extra: str) -> None:
    workers = [start(sweep_command(sweep_file, out, *extra), logs / f"w{i}.log") for i in (0, 1)]
    for i, worker in enumerate(workers):
        assert worker.wait(timeout=600) == 0, (logs / f"w{i}.log").read_text()[-4000:]


def assert_split_without_repeats(study: optuna.Study, out: Path) -> None:
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    slots = [t.user_attrs[claims.SLOT] for t in complete]
    assert sorted(slots) == sorted(run_folders(out)), "each run completed by exactly one trial"
    workers = {t.user_attrs[claims.WORKER]["id"] for t in complete}
    assert len(workers) == 2, "both workers ran trials"
    others = [t for t in study.get_trials() if t not in complete]
    assert all(claims.SKIPPED in t.user_attrs for t in others), "only skipped duplicates besides"
    for folder in run_folders(out).values():
        assert trained_once(folder), f"{folder.name} was trained more than once"


def test_two_workers_on_the_journal_split_the_trials(sweep_file, reference, tmp_path):
    out = tmp_path / "sweep"
    two_workers(sweep_file, out, tmp_path)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "optuna-journal.log"))
    )
    assert_split_without_repeats(optuna.load_study(study_name="three", storage=storage), out)
    assert_same_results(out, reference)


@pytest.fixture
def postgres_url():
    """A real PostgreSQL server of its own, in a temporary folder, stopped afterwards."""
    bindir = postgres_bindir()
    need("PostgreSQL server (initdb, pg_ctl)", bindir)
    root = Path(tempfile.mkdtemp(prefix="sdlora-pg-"))
    as_user = []
    if os.geteuid() == 0:  # postgres refuses to run as root; its data must be its own
        need("runuser", shutil.which("runuser"))
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, ctl = root / "data", [*as_user, str(bindir / "pg_ctl"), "-D", str(root / "data")]

    def run(cmd: list[str]) -> None:
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr

    try:
        run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "sdlora"])
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
        run([*ctl, "-o", options, "-l", str(root / "server.log"), "-w", "start"])
        yield f"postgresql://sdlora@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*ctl, "-m", "immediate", "stop"], cwd=root, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_on_postgresql_split_the_trials(sweep_file, reference, postgres_url, tmp_path):
    out = tmp_path / "sweep"
    two_workers(sweep_file, out, tmp_path, "--storage", postgres_url)
    assert not (out / "optuna-journal.log").exists()
    storage = optuna.storages.RDBStorage(postgres_url.replace("://", "+psycopg://", 1))
    assert_split_without_repeats(optuna.load_study(study_name="three", storage=storage), out)
    assert_same_results(out, reference)


def test_report_html_opens_in_chromium_and_every_image_decodes(reference, tmp_path):
    browser = chromium()
    need("chromium", browser)
    page = (reference / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(FIGURES)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http" not in page.replace("http-equiv", ""), "self-contained: nothing fetched"
    # The page as sent, plus a probe that writes each image's decoded width into the DOM.
    probe = (
        "<script>addEventListener('load', () => document.body.setAttribute('data-widths', "
        "[...document.images].map(i => i.complete ? i.naturalWidth : -1).join(',')));</script>"
    )
    copy = tmp_path / "report.html"
    copy.write_text(page.replace("</body>", probe + "</body>"))
    done = subprocess.run(
        [
            browser, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
            "--dump-dom", copy.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    found = re.search(r'data-widths="([^"]*)"', done.stdout)
    assert found, done.stdout[-2000:] + done.stderr[-2000:]
    widths = [int(w) for w in found.group(1).split(",")]
    assert len(widths) == len(FIGURES) and all(w > 0 for w in widths), widths


def test_report_only_rebuilds_the_same_report(sweep_file, reference, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(reference, out)
    for name in FILES:
        (out / name).unlink()
    assert cli.main(["sweep", str(sweep_file), "--out", str(out), "--report-only"]) == 0
    for name in FILES:
        assert (out / name).is_file()
    rows, ref = summary(out), summary(reference)
    assert {k: [r[c] for c in VALUE_COLUMNS] for k, r in rows.items()} == {
        k: [r[c] for c in VALUE_COLUMNS] for k, r in ref.items()
    }


def test_validation_loss_of_one_lora_is_identical_across_two_evaluations(reference):
    """The objective depends only on the weights: the trained LoRA scored twice gives the same
    number, and the number its run recorded."""
    from trainer.config import load as config
    from trainer.data.feed import checked_examples
    from trainer.lora import adapters as lora
    from trainer.models import load as models
    from trainer.run.validation import Validator

    folder = next(iter(run_folders(reference).values()))
    cfg = config.load(folder / "config.toml")
    parts = models.load_components(cfg.model)
    lora.attach(parts.unet, None, cfg.lora)
    lora.load_into(find_latest(folder) / WEIGHTS_NAME, parts.unet, None)
    _, held_out = checked_examples(cfg, show_progress=False)
    val = cfg.validation

    def score() -> float:
        validator = Validator(held_out, parts.tokenizer, parts.vae, val.timesteps,
                              cfg.train.seed, val.batch_size)  # fmt: skip
        return validator.loss(parts.unet, parts.text_encoder, parts.noise_scheduler, "cpu")

    first, second = score(), score()
    assert first == second
    assert first == pytest.approx(read_metrics(folder)[-1]["val_loss"], rel=1e-5)
