"""The ``sdlora`` command line: one entry point, one subcommand per job.

    sdlora train --config FILE [--set table.key=value ...] [--resume latest|PATH] [--stop-at N]
    sdlora lr-plot --config FILE [--set ...] [--csv FILE] [--png FILE] [--compare NAME ...]
    sdlora lr-find --config FILE [--set ...] [--min LR] [--max LR] [--steps N] [--out DIR]
    sdlora schedules [NAME]
    sdlora export SOURCE [--format diffusers|kohya|both] [--out DIR] [--dtype D] [--name N]
    sdlora inspect FILE [--against MODEL] [--modules] [--json]
    sdlora sample --lora FILE --model MODEL --prompt TEXT [--scales 0,0.5,1] [--out grid.png]
    sdlora sweep FILE [--storage URL] [--out DIR] [--launch "FLAGS"] [--report-only]
    sdlora serve [--host 127.0.0.1] [--port 8000] [--access-log]
    sdlora config-help
    sdlora --version

``train.py`` at the repository root is the ``accelerate launch`` target for ``sdlora train``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from trainer.config.load import ConfigError


def package_version() -> str:
    """The installed sdlora version; from pyproject.toml when run from a source tree.

    The installed metadata is what ``pip`` and bug reports see; the fallback keeps
    ``--version`` working from a plain checkout (``python -m trainer.commands.cli``) that was never
    installed.
    """
    from importlib import metadata

    try:
        return metadata.version("sdlora")
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown (not installed, and no pyproject.toml beside the package)"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="TOML config file, e.g. configs/tiny.toml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="override one config key (TOML value); repeatable, e.g. --set train.max_steps=50",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="sdlora", description="Stable Diffusion LoRA trainer")
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {package_version()}",
        help="print the installed sdlora version and exit",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="what to do (COMMAND -h: its flags)"
    )
    # Every word after `launch` is accelerate launch's (its --help included): a prefix that no
    # argument starts with makes them all positional here.
    launch = sub.add_parser(
        "launch",
        add_help=False,
        prefix_chars="\0",
        help="accelerate launch [its flags] train.py ..., ending a failed run with the run's own "
        "error and exit status instead of a launcher traceback",
    )
    launch.add_argument(
        "words", nargs=argparse.REMAINDER, help="accelerate launch's flags, train.py and its flags"
    )
    train = sub.add_parser("train", help="train LoRA adapters from a TOML config")
    _add_config_args(train)
    train.add_argument(
        "--resume",
        metavar="latest|PATH",
        help="resume from the newest checkpoint in output_dir, or from a step-NNNNNN folder "
        "(same as checkpoint.resume)",
    )
    train.add_argument(
        "--allow-change",
        metavar="KEYS",
        help="comma-separated config keys or tables that may differ from the checkpoint's, "
        "e.g. max_steps,lr_scheduler (same as checkpoint.allow_change)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: remove the weights, checkpoints, metrics and logs an earlier run left "
        "in output_dir (never done without this flag)",
    )
    train.add_argument(
        "--stop-at",
        type=int,
        metavar="N",
        help="stop after optimizer update N with a checkpoint there, as a signal would, and exit "
        "0 (a sweep's shared prefix ends so); a run already at N trains nothing",
    )
    plot = sub.add_parser(
        "lr-plot", help="preview the LR of every param group at every update (no model needed)"
    )
    _add_config_args(plot)
    plot.add_argument(
        "--csv",
        help="write step,lr_0,lr_1,... to this file: every update of runs up to 10,000 "
        "updates, an exact sample of longer ones (the output says which)",
    )
    plot.add_argument("--png", help="plot the curve (and --compare curves) to this PNG")
    plot.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="NAME[:key=value,...]",
        help="other schedules to overlay in the PNG, e.g. linear cosine_with_restarts:num_cycles=3",
    )
    plot.add_argument(
        "--processes", type=int, help="processes the run will use (default: WORLD_SIZE or 1)"
    )
    plot.add_argument(
        "--examples", type=int, help="assume this many examples instead of reading data.path"
    )
    _add_lr_find(sub)
    _add_export(sub)
    _add_inspect(sub)
    _add_sample(sub)
    sweep = sub.add_parser(
        "sweep",
        help="run a sweep file's trials (LR schedules, LRs, ...) on Optuna and report a verdict",
    )
    sweep.add_argument("file", help="the sweep file, e.g. configs/sweeps/tiny_schedules.toml")
    sweep.add_argument(
        "--storage",
        metavar="URL",
        help="an Optuna RDB URL shared by workers on several machines, e.g. "
        "postgresql://user:pass@host/db (default: a journal file in the sweep folder); the "
        "sweep extra has the drivers of postgresql:// and sqlite:///",
    )
    sweep.add_argument("--out", metavar="DIR", help="the sweep folder (replaces output_dir)")
    sweep.add_argument(
        "--launch",
        metavar="FLAGS",
        help="accelerate launch flags of every trial, replacing the file's launch list, e.g. "
        '"--multi_gpu --num_processes 4"',
    )
    sweep.add_argument(
        "--report-only", action="store_true", help="rebuild the report from the study alone"
    )
    sweep.add_argument(
        "--retry-failed",
        action="store_true",
        help="queue again the trials that failed (after fixing what made them fail)",
    )
    _add_serve(sub)
    schedules = sub.add_parser("schedules", help="list LR schedules, or describe one")
    schedules.add_argument("name", nargs="?", help="a schedule to describe")
    sub.add_parser("config-help", help="print every config table and key with its doc")
    return parser


def _add_lr_find(sub: argparse._SubParsersAction) -> None:
    find = sub.add_parser(
        "lr-find",
        help="the LR range test: a short run while the LR rises from --min to --max; writes "
        "lr_find.csv and lr_find.png and suggests a base LR (docs/lr_find.md)",
    )
    _add_config_args(find)
    find.add_argument(
        "--min", type=float, default=1e-7, help="the LR of the first update (default 1e-7)"
    )
    find.add_argument(
        "--max", type=float, default=1e-1, help="the LR of the last update (default 1e-1)"
    )
    find.add_argument(
        "--steps", type=int, default=100, help="optimizer updates of the ramp (default 100)"
    )
    find.add_argument(
        "--diverge",
        type=float,
        default=4.0,
        help="stop when the smoothed loss exceeds this many times its lowest value (default 4)",
    )
    find.add_argument(
        "--smooth",
        type=float,
        default=0.98,
        help="the loss's moving-average weight of the past, in [0, 1) (default 0.98, as fastai)",
    )
    find.add_argument(
        "--val-points",
        type=int,
        default=5,
        help="validation losses along the ramp, with held-out images (default 5; 0: none)",
    )
    find.add_argument(
        "--out",
        metavar="DIR",
        help="where lr_find.csv and lr_find.png go (default: <output_dir>/lr_find); nothing "
        "else is left behind",
    )


def _add_serve(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="answer LR schedules over HTTP (POST /lr_schedule), with Prometheus /metrics "
        "(pip install 'sdlora[serve]'; docs/serve.md)",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0: every "
        "interface, as in a container)",
    )
    serve.add_argument(
        "--port", type=int, default=8000, help="TCP port (default 8000; 0: any free one, printed)"
    )
    serve.add_argument(
        "--access-log", action="store_true", help="log every request (/metrics counts them anyway)"
    )


def _add_export(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export",
        help="write a saved LoRA (final or checkpoint) for diffusers and/or A1111, ComfyUI, "
        "SD.Next (kohya format)",
    )
    export.add_argument(
        "source", help="an output_dir or checkpoints/step-NNNNNN folder, or its weights file"
    )
    export.add_argument(
        "--format",
        choices=["diffusers", "kohya", "both"],
        default="both",
        help="'diffusers' = pytorch_lora_weights.safetensors, 'kohya' = NAME.safetensors for "
        "A1111/ComfyUI/SD.Next, 'both' (default); each adapter type only where training "
        "writes it (LoHa, LoKr, per-input DoRA: not 'diffusers'; per-output DoRA: only it)",
    )
    export.add_argument(
        "--out",
        metavar="DIR",
        help="destination folder (default: output_dir/export/step-NNNNNN for a checkpoint, "
        "else SOURCE/export)",
    )
    export.add_argument(
        "--dtype",
        choices=["fp16", "bf16", "fp32"],
        help="dtype of the weights (default: the run's output.save_dtype, else fp16)",
    )
    export.add_argument(
        "--name",
        help="LoRA name: kohya file name and the name A1111 lists (default: the run's "
        "output.name or its output_dir's name)",
    )
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files in the destination that hold other weights (a rerun of the same "
        "export needs no flag)",
    )


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    inspect = sub.add_parser(
        "inspect",
        help="show what a LoRA file holds (any trainer's): format, base model, ranks, targets, "
        "metadata, hash; with --against, the keys a client would drop",
    )
    inspect.add_argument("file", help="a LoRA .safetensors file (kohya, LyCORIS or diffusers)")
    inspect.add_argument(
        "--against",
        metavar="MODEL",
        help="a diffusers model folder: list every key that names no module of that model "
        "(exit status 1 when there is one)",
    )
    inspect.add_argument(
        "--modules", action="store_true", help="also list every module with its rank and alpha"
    )
    inspect.add_argument(
        "--json", action="store_true", help="print the report as JSON instead of text"
    )


# A --scales value that starts with "-" (``-1,0.5``, ``-.5``, ``-inf``): argparse reads any
# word starting with "-" as an option unless it is one plain negative number.
_NEGATIVE_SCALES = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _join_negative_scales(args: Sequence[str]) -> list[str]:
    """``--scales -1,0.5`` → ``--scales=-1,0.5``, which argparse reads as the value."""
    out: list[str] = []
    for arg in args:
        if out and out[-1] == "--scales" and _NEGATIVE_SCALES.match(arg):
            out[-1] = f"--scales={arg}"
        else:
            out.append(arg)
    return out


def _add_sample(sub: argparse._SubParsersAction) -> None:
    sample = sub.add_parser(
        "sample",
        help="fixed-seed images of the base model and of a LoRA at several scales, as one PNG",
    )
    # The top-level parser hands every word after "sample" to this one through
    # parse_known_args; joining there makes `--scales -1,0.5` work on every Python.
    parse = sample.parse_known_args

    def parse_known_args(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        return parse(None if args is None else _join_negative_scales(args), namespace)

    sample.parse_known_args = parse_known_args
    sample.add_argument("--lora", required=True, help="the LoRA file (any format diffusers reads)")
    sample.add_argument(
        "--model",
        required=True,
        help="the base model: a diffusers folder or hub id, of the LoRA's family (SD 1.x, "
        "SD 2.x or SDXL)",
    )
    sample.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        required=True,
        help="a prompt; repeat for one grid row per prompt",
    )
    sample.add_argument("--negative-prompt", default="", help="negative prompt for every image")
    sample.add_argument(
        "--scales",
        default="0,0.5,1",
        metavar="S,S,...",
        help="LoRA scales, one column each (default 0,0.5,1); negative ones invert the LoRA: "
        "--scales -1,0,1 or --scales=-1,0,1",
    )
    sample.add_argument("--seed", type=int, default=0, help="seed of every image (default 0)")
    sample.add_argument(
        "--steps", type=int, default=20, help="denoising steps, at least 1 (default 20)"
    )
    sample.add_argument(
        "--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)"
    )
    sample.add_argument(
        "--resolution",
        type=int,
        help="image side in pixels, a multiple of 8 (default: the LoRA's modelspec.resolution, "
        "else 512)",
    )
    sample.add_argument("--out", default="grid.png", help="the PNG to write (default grid.png)")
    sample.add_argument(
        "--device",
        default="",
        help="torch device, e.g. cuda, cuda:1 or cpu (default: cuda if present, else cpu)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Load the config and run training."""
    from trainer.config import load as config
    from trainer.run.trial import trial_process

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={json.dumps(args.resume)}")
    if args.allow_change:
        keys = [k.strip() for k in args.allow_change.split(",") if k.strip()]
        overrides.append(f"checkpoint.allow_change={json.dumps(keys)}")
    cfg = config.load(args.config, overrides)
    # Preflight needs torch but none of diffusers, peft or accelerate: every problem it finds
    # (paths, data, resume point) is reported before those libraries' seconds of imports.
    from trainer.run import preflight

    start = time.monotonic()
    # A sweep worker's trial holds its run folder's lock and registers its pid; a no-op else.
    stop_at = args.stop_at
    if stop_at is not None and stop_at < 1:
        raise ConfigError([f"--stop-at {stop_at}: an optimizer update, >= 1"], "sdlora train")
    with trial_process():
        processes, is_main = preflight.launch()
        checked = preflight.check(cfg, processes, args.overwrite, is_main)
        if stop_at is not None and not checked.complete and checked.updates_done >= stop_at:
            if is_main:
                print(f"nothing to train: the run in {cfg.output_dir} is at update "
                      f"{checked.updates_done}, at or past --stop-at {stop_at}")  # fmt: skip
            return 0
        from trainer.run import loop

        result = loop.run(cfg, overwrite=args.overwrite, checked=checked, stop_at=stop_at)
    asked = result.interrupted and stop_at is not None and result.updates == stop_at
    if not result.is_main_process:
        return 130 if result.interrupted and not asked else 0
    if asked:
        print(
            f"stopped at update {result.updates} as asked (--stop-at); continue with:\n  "
            f"{resume_command()}",
            flush=True,
        )
        return 0
    if result.interrupted:
        print(
            f"stopped after {result.updates} updates; resume with:\n  {resume_command()}",
            flush=True,
        )
        return 130
    if result.already_complete:
        # What was verified or written was logged as it happened; this is the verdict.
        print(f"nothing to train: the run in {result.output_dir} is complete")
        return 0
    from trainer.commands import summary

    longer = resume_command(max_steps=2 * result.updates)
    duration = time.monotonic() - start
    print(summary.render(cfg, result.updates, result.stats, duration, longer), flush=True)
    return 0


def resume_command(
    argv: Sequence[str] | None = None,
    parent: Sequence[str] | None = None,
    max_steps: int | None = None,
) -> str:
    """The shell command that resumes this run: how it was launched, every flag it was given
    (``--set``, ``--allow-change``...), ``--resume latest`` instead of any ``--resume``, and no
    ``--overwrite`` (which would start over) or ``--stop-at`` (which would stop at once), quoted
    for the shell and run from this folder.

    Args:
        argv: This process's arguments (default ``sys.argv``).
        parent: The launching process's arguments, when it was ``accelerate launch`` (default:
            read from /proc on Linux).
        max_steps: Resume to this many updates instead: ``--set train.max_steps=N`` replaces
            any given, and ``max_steps`` joins the keys of ``--allow-change``.
    """
    argv = list(sys.argv if argv is None else argv)
    args, allowed, pending = [], [], None
    for arg in argv[1:]:
        if pending is not None:
            flag, pending = pending, None
            if flag == "--allow-change":
                allowed.append(arg)
            elif flag == "--set" and max_steps is not None and _sets_max_steps(arg):
                pass
            elif flag not in ("--resume", "--stop-at"):
                args += [flag, arg]
            continue
        name, eq, value = arg.partition("=")
        if arg == "--overwrite" or (name == "--stop-at" and eq):
            continue
        if name in ("--resume", "--allow-change", "--set", "--stop-at") and not eq:
            pending = name
        elif name == "--allow-change":
            allowed.append(value)
        elif name == "--set" and max_steps is not None and _sets_max_steps(value):
            continue
        elif name != "--resume":
            args.append(arg)
    if max_steps is not None:
        args += ["--set", f"train.max_steps={max_steps}"]
        allowed.append("max_steps")
    keys = dict.fromkeys(k.strip() for a in allowed for k in a.split(",") if k.strip())
    if keys:
        args += ["--allow-change", ",".join(keys)]
    args += ["--resume", "latest"]
    launcher = _launcher(argv[0], _parent_argv() if parent is None else parent)
    command = " ".join(shlex.quote(a) for a in [*launcher, *args])
    return f"cd {shlex.quote(os.getcwd())} && {command}"


def _sets_max_steps(assignment: str) -> bool:
    return assignment.partition("=")[0].strip() in ("train.max_steps", "max_steps")


# The launchers whose flags a resume must repeat, as ``python -m MODULE``: ours, which is
# accelerate's without its traceback (``sdlora launch``), and accelerate's own module form.
LAUNCH_MODULES = ("trainer.commands.launch", "accelerate.commands.launch")


def _launcher(program: str, parent: Sequence[str]) -> list[str]:
    """How this process was started: ``sdlora launch [its flags] train.py``, ``accelerate
    launch [its flags] train.py`` (or either as ``python -m MODULE``), ``python train.py`` or
    ``sdlora``, read from the launching process where it was a launcher."""
    script = Path(program).name
    if script == "train.py":
        end = next((i for i, a in enumerate(parent) if Path(a).name == "train.py"), len(parent))
        for i, arg in enumerate(parent[: end - 1]):
            if arg == "-m" and parent[i + 1] in LAUNCH_MODULES:
                # This interpreter: the launcher started the run with its own sys.executable.
                return [sys.executable, *parent[i:end], program]
        for name in ("sdlora", "accelerate"):  # `sdlora launch ...`, `accelerate launch ...`
            start = next((i for i, a in enumerate(parent[:end]) if Path(a).name == name), None)
            if start is not None and "launch" in parent[start + 1 : end]:
                return [parent[start], *parent[start + 1 : end], program]
        return [sys.executable, program]
    if script == "sdlora":
        return [program]
    return [sys.executable, "-m", "trainer.commands.cli"]


def _parent_argv() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:  # not Linux, or not allowed: fall back to this process's own arguments
        return []
    return [a for a in raw.decode(errors="replace").split("\0") if a]


def cmd_launch(args: argparse.Namespace) -> int:
    """``accelerate launch`` with the given words, ending with the run's own exit status."""
    from trainer.commands.launch import main as launch

    return launch(args.words)


def cmd_lr_plot(args: argparse.Namespace) -> int:
    """Print the LR table; write the CSV / PNG asked for."""
    from trainer.commands import lr_plot
    from trainer.config import load as config

    cfg = config.load(args.config, args.overrides)
    print(lr_plot.run(cfg, args.csv, args.png, args.compare, args.processes, args.examples))
    for label, path in (("csv", args.csv), ("png", args.png)):
        if path:
            print(f"wrote {label}: {path}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    """Run the LR range test; print what it found and a sweep around the suggestion."""
    from trainer.commands import lr_find

    options = lr_find.Options(
        min_lr=args.min,
        max_lr=args.max,
        steps=args.steps,
        diverge=args.diverge,
        smooth=args.smooth,
        val_points=args.val_points,
        out=args.out or "",
    )
    try:
        found = lr_find.run(args.config, args.overrides, options)
    except KeyboardInterrupt:
        print("lr-find stopped before its end; nothing was written", file=sys.stderr)
        return 130
    if found is not None:
        print(found[0], flush=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a saved LoRA in the client formats."""
    from trainer.commands.export import export

    for path in export(args.source, args.format, args.out, args.dtype, args.name, args.overwrite):
        print(f"wrote {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Describe a LoRA file, and what a client would drop."""
    from trainer.commands.inspect import format_report, inspect

    report = inspect(args.file, args.against)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_report(report, list_modules=args.modules))
    # Like a linter: a LoRA that would lose keys in a client fails a script that checks it.
    return 1 if report.unmatched or report.wrong_shape else 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Render the base-vs-LoRA comparison grid, once every problem of the request is ruled
    out (all of them reported together, before any model loads)."""
    from trainer.commands import sample
    from trainer.commands.sample_checks import problems
    from trainer.lora.files import LoraFileError

    found = []
    try:
        scales = sample.parse_scales(args.scales)
    except ValueError as err:
        found.append(str(err))
        scales = ()
    try:
        source = sample.check_lora(Path(args.lora))
    except LoraFileError as err:
        found.append(f"--lora {err}")
        source = None
    side = args.resolution
    if side is None:
        side = source.resolution if source is not None else 512
    settings = sample.SampleSettings(
        prompts=tuple(args.prompts),
        scales=scales,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        width=side,
        height=side,
        negative_prompt=args.negative_prompt,
    )
    found += problems(source, args.model, settings, args.device)
    if found or source is None:
        raise ConfigError(found, "sdlora sample")
    print(f"wrote {sample.draw(source, args.model, settings, args.out, args.device)}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run this worker's share of a sweep (or only rebuild its report)."""
    try:
        from trainer.sweep import spec, worker
    except ImportError as err:
        raise ConfigError(
            [f"sdlora sweep needs Optuna ({err}); install it: pip install -e '.[sweep]'"],
            "sdlora sweep",
        ) from err
    # The file's problems are reported together with those of its runs and --storage.
    sweep, problems = spec.read(args.file, args.out)
    launch = shlex.split(args.launch) if args.launch is not None else list(sweep.file.launch)
    # Warm trials (warm_workers) call the training command's own entry in the worker.
    return worker.run(sweep, launch, args.storage, args.report_only, args.retry_failed, problems,
                      entry=_train_in_process)  # fmt: skip


def _train_in_process(args: list[str]) -> int:
    """``train.py ARGS`` in this process, with its exit status: a sweep's warm trial."""
    return main(["train", *args])


# The serve extra's packages, by import name: one missing is named with the extra to install.
SERVE_PACKAGES = ("starlette", "uvicorn", "prometheus_client")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the LR schedules over HTTP until SIGINT or SIGTERM."""
    try:
        from trainer.commands import serve
    except ImportError as err:
        package = (err.name or "").split(".")[0]
        if package not in SERVE_PACKAGES:
            raise
        raise ConfigError(
            [f"sdlora serve needs the {package} package; install it: pip install 'sdlora[serve]'"],
            "sdlora serve",
        ) from err
    return serve.serve(args.host, args.port, args.access_log)


def cmd_schedules(args: argparse.Namespace) -> int:
    """List the registered schedules, or describe one with its fields."""
    import schedulers

    if args.name:
        try:
            print(schedulers.describe(args.name))
        except (schedulers.UnknownScheduleError, schedulers.ScheduleRegistryError) as err:
            raise ConfigError([str(err)], "sdlora schedules") from err
        return 0
    for name in schedulers.available():
        doc = (schedulers.get(name).__doc__ or "").strip().splitlines()
        print(f"{name:24} {doc[0] if doc else ''}")
    return 0


def cmd_config_help(args: argparse.Namespace) -> int:
    """Print the config reference."""
    from trainer.config import load as config

    print(config.describe())
    return 0


COMMANDS = {
    "launch": cmd_launch,
    "train": cmd_train,
    "lr-plot": cmd_lr_plot,
    "lr-find": cmd_lr_find,
    "schedules": cmd_schedules,
    "export": cmd_export,
    "inspect": cmd_inspect,
    "sample": cmd_sample,
    "sweep": cmd_sweep,
    "serve": cmd_serve,
    "config-help": cmd_config_help,
}
# The commands that load models: the installed libraries are checked against sdlora's ranges
# before they start, so a mismatched set is named as such instead of failing deep inside.
LOADS_MODELS = {"train", "lr-find", "export", "inspect", "sample", "sweep"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; a bad config or dataset prints its problems and exits with 2."""
    from trainer import quiet

    quiet.import_notices()
    from trainer.errors import UserError
    from trainer.run.versions import IncompatibleEnvironment, check

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command in LOADS_MODELS:
            check()
        return COMMANDS[args.command](args)
    except (
        ConfigError,
        UserError,
    ) as err:
        # Under a multi-process launch every process reads the same config and environment
        # and finds the same problems: the first process prints them once.
        same_everywhere = isinstance(err, (ConfigError, IncompatibleEnvironment))
        if not same_everywhere or os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `sdlora inspect FILE | head`: the reader left; that is not an error of ours. Point
        # stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
