#!/usr/bin/env bash
# The whole GPU check in one command, on a bare CUDA machine, everything written under --out
# (docs/gpu.md). Each step is time-boxed and the report is rewritten after each benchmark
# step, so the first results are there even if a later step overruns or the call is cut off:
#   env     nvidia-smi; install the carried wheels (make gpu-wheels) with --no-index; print
#           the versions it runs with, torch's and CUDA's among them
#   pytest  pytest -m cuda tests/test_cuda.py
#   peak    the bf16 matmul peak that MFU is measured against
#   sd15    bench_gpu.py on the sd15-shape model (built here, seeded, fp16), batch 1, 4, 16,
#           cached latents, ours and the diffusers script, fp16 and bf16, SDPA
#   extras  xformers (when its wheel loads against this torch), then gradient checkpointing,
#           channels_last and torch.compile, ours at batch 16 fp16 beside a plain run
#   sdxl    the sdxl-shape model at 1024 px, batch 1 and 4, ours, bf16
# --dry-run runs every step on the CPU with tiny shapes (CI; a check before a loan).
set -uo pipefail

usage() {
	cat <<'EOF'
usage: scripts/gpu_check.sh [--dry-run] --out DIR [--steps env,pytest,peak,sd15,extras,sdxl]
                            [--deadline SECONDS] [--limits STEP=S,...] [--work DIR] [--wheels DIR]
                            [--diffusers-script PATH]
  --out DIR              bench_gpu.md, bench_gpu.json, pytest.log, gpu_check.log, bench_logs.tar.gz
  --steps LIST           the steps to run (default: all, in that order)
  --deadline SECONDS     no step starts, or runs on, past this (default 450 on a GPU: a
                         15-minute loan keeps room for the machine's start and one rerun)
  --limits STEP=S,...    change steps' own limits (seconds), e.g. sd15=360,sdxl=240
  --work DIR             models, data, runs (default /tmp/gpu_check; kept for a rerun)
  --wheels DIR           the folder make gpu-wheels filled (default .whl)
  --diffusers-script P   train_text_to_image_lora.py (default WHEELS/peer/, else no peer)
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$REPO/scripts/gpu_check.sh"

# ---------------------------------------------------------------- the steps (run in a child)

bench() { # bench NAME ARGS...: bench_gpu.py into $WORK/NAME.json, then the merged report
	local name=$1
	shift
	"$PY" scripts/bench_gpu.py --device "$DEVICE" --work "$WORK/bench" --threads "$THREADS" \
		--json "$WORK/$name.json" --markdown "$WORK/$name.md" "$@"
	local rc=$?
	"$PY" scripts/gpu_check_report.py --work "$WORK" --out "$OUT" || true
	return $rc
}

step_env() {
	if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
	if [ "$DRY" = 1 ]; then
		if compgen -G "$WHEELS/*.whl" >/dev/null; then
			"$PY" scripts/gpu_env.py install --wheels "$WHEELS" --target "$WORK/site" --dry-run || return
		else
			echo "no wheels in $WHEELS: the install is not checked (make gpu-wheels)"
		fi
	elif compgen -G "$WHEELS/*.whl" >/dev/null; then
		"$PY" scripts/gpu_env.py install --wheels "$WHEELS" --target "$SITE" || return
	else
		echo "no wheels in $WHEELS: running on what this machine has (make gpu-wheels carries the rest)"
	fi
	"$PY" scripts/gpu_env.py versions --lock "$LOCK" --json "$WORK/env.json"
}

step_pytest() { # on a machine without CUDA every test skips
	"$PY" -m pytest -m cuda tests/test_cuda.py -rA -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
}

step_peak() {
	"$PY" scripts/bench_probe.py --device "$DEVICE" "${PEAK_ARGS[@]}" --json "$WORK/peak.json"
}

step_sd15() {
	local peer=() peak=()
	[ -n "$PEER" ] && peer=(--diffusers-script "$PEER")
	[ -f "$WORK/peak.json" ] && peak=(--peak "$WORK/peak.json")
	bench sd15 "${SD15_ARGS[@]}" --batch-sizes "${SD15_BATCHES[@]}" \
		--precisions "${SD15_PRECISIONS[@]}" --latents cached --attention sdpa \
		"${peer[@]}" "${peak[@]}" --budget-s "$1"
}

XF_CHECK="import xformers, xformers.ops; assert xformers._has_cpp_library, 'its C++/CUDA extension does not load'; print('xformers', xformers.__version__, 'loads')"
xformers_loads() { # the Python's own xformers
	XF_PATH=$PYTHONPATH XF_LIB=${LD_LIBRARY_PATH:-}
	"$PY" -c "$XF_CHECK" 2>/dev/null
}
carried_xformers_loads() { # the wheel make gpu-wheels carried, and libcudart.so.12 for it
	compgen -G "$WHEELS/xformers/xformers-*.whl" >/dev/null || {
		echo "xformers: none installed, and no wheel in $WHEELS/xformers (make gpu-wheels)"
		return 1
	}
	"$PY" scripts/gpu_env.py xformers --wheels "$WHEELS/xformers" --target "$WORK/site-xformers" \
		--lib "$WORK/cu12" || return
	XF_PATH="$WORK/site-xformers:$PYTHONPATH" XF_LIB="$WORK/cu12${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
	PYTHONPATH=$XF_PATH LD_LIBRARY_PATH=$XF_LIB "$PY" -c "$XF_CHECK"
}

step_extras() {
	local budget=$1 start=$SECONDS calibration=() rc=0
	[ -f "$WORK/sd15.json" ] && calibration=(--calibration "$WORK/sd15.json")
	local b=$EXTRA_BATCH p=$EXTRA_PRECISION
	# xformers first: the one this Python has, else the carried wheel with its CUDA 12.8
	# runtime beside this torch, in a subshell so that nothing else runs with it.
	if [ "$DRY" = 1 ]; then
		echo "xformers: not tried in a dry run (no CUDA)"
	elif xformers_loads || carried_xformers_loads; then
		local peer=()
		[ -n "$PEER" ] && peer=("diffusers-b$b-uncached-$p-xformers" --diffusers-script "$PEER")
		(
			export PYTHONPATH=$XF_PATH LD_LIBRARY_PATH=$XF_LIB
			"$PY" -m pytest -m cuda tests/test_cuda.py -k xformers -rA -p no:cacheprovider 2>&1 |
				tee -a "$OUT/pytest.log"
			bench xformers "${SD15_ARGS[@]}" "${calibration[@]}" --budget-s "$budget" \
				--variants "ours-b$b-cached-$p-xformers" "${peer[@]}"
		) || rc=1
	else
		echo "xformers: no build here loads its extension against torch $("$PY" -c 'import torch; print(torch.__version__)'); skipped"
	fi
	# A plain run first: the options are compared with it, minutes apart at most.
	local variants=("ours-b$b-cached-$p-sdpa" "ours-b$b-cached-$p-sdpa-gc" "ours-b$b-cached-$p-sdpa-cl"
		"ours-b$b-cached-$p-sdpa-compile")
	if [ "$DRY" = 1 ]; then # one option: the sd15 step's run is the plain one
		echo "dry run: gradient checkpointing only (channels_last and torch.compile take minutes here)"
		variants=("ours-b$b-cached-$p-sdpa-gc")
	fi
	bench extras "${SD15_ARGS[@]}" "${calibration[@]}" --variants "${variants[@]}" \
		--timeout 300 --budget-s "$((budget - (SECONDS - start)))" || rc=1
	return $rc
}

step_sdxl() {
	local peak=()
	[ -f "$WORK/peak.json" ] && peak=(--peak "$WORK/peak.json")
	bench sdxl "${SDXL_ARGS[@]}" "${peak[@]}" --budget-s "$1"
}

if [ "${1:-}" = "--_step" ]; then # a child: state comes in the environment (see below)
	cd "$REPO" || exit 1
	IFS=$'\x1f' read -r -a PEAK_ARGS <<<"$PEAK_ARGS_S"
	IFS=$'\x1f' read -r -a SD15_ARGS <<<"$SD15_ARGS_S"
	IFS=$'\x1f' read -r -a SD15_BATCHES <<<"$SD15_BATCHES_S"
	IFS=$'\x1f' read -r -a SD15_PRECISIONS <<<"$SD15_PRECISIONS_S"
	IFS=$'\x1f' read -r -a SDXL_ARGS <<<"$SDXL_ARGS_S"
	"step_$2" "${3:-0}"
	exit
fi

# ---------------------------------------------------------------- arguments and settings

DRY=0 OUT="" STEPS="env,pytest,peak,sd15,extras,sdxl" DEADLINE="" LIMITS="" WORK="" WHEELS="$REPO/.whl" PEER=""
while [ $# -gt 0 ]; do
	case $1 in
	--dry-run) DRY=1 ;;
	--out | --steps | --deadline | --limits | --work | --wheels | --diffusers-script)
		[ $# -ge 2 ] || {
			echo "error: $1 needs a value" >&2
			exit 2
		}
		case $1 in
		--out) OUT=$2 ;;
		--steps) STEPS=$2 ;;
		--deadline) DEADLINE=$2 ;;
		--limits) LIMITS=$2 ;;
		--work) WORK=$2 ;;
		--wheels) WHEELS=$2 ;;
		--diffusers-script) PEER=$2 ;;
		esac
		shift
		;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		echo "error: unknown argument $1" >&2
		usage >&2
		exit 2
		;;
	esac
	shift
done
[ -n "$OUT" ] || {
	echo "error: --out DIR is required (where the report goes; on the device tool: --out \$OUT)" >&2
	exit 2
}
known() { case $1 in env | pytest | peak | sd15 | extras | sdxl) ;; *) return 1 ;; esac }
for s in ${STEPS//,/ }; do
	known "$s" || {
		echo "error: --steps: unknown step $s (env, pytest, peak, sd15, extras, sdxl)" >&2
		exit 2
	}
done
for pair in ${LIMITS//,/ }; do
	[[ "$pair" =~ ^([a-z0-9]+)=([0-9]+)$ ]] && known "${BASH_REMATCH[1]}" || {
		echo "error: --limits $pair: expected STEP=SECONDS with a step of --steps" >&2
		exit 2
	}
done
[[ -z "$DEADLINE" || "$DEADLINE" =~ ^[0-9]+$ ]] || {
	echo "error: --deadline $DEADLINE: a whole number of seconds" >&2
	exit 2
}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WHEELS=$(cd "$REPO" && realpath -m "$WHEELS")
if [ -z "$PEER" ] && [ -f "$WHEELS/peer/train_text_to_image_lora.py" ]; then
	PEER="$WHEELS/peer/train_text_to_image_lora.py"
fi
[ -z "$PEER" ] || [ -f "$PEER" ] || {
	echo "error: --diffusers-script $PEER: no such file" >&2
	exit 2
}
[ -z "$PEER" ] || PEER=$(realpath "$PEER")

if [ "$DRY" = 1 ]; then
	DEVICE=cpu THREADS=2 LOCK=requirements/cpu.lock
	PY=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
	WORK=${WORK:-$(mktemp -d /tmp/gpu_check_dry.XXXXXX)}
	DEADLINE=${DEADLINE:-900}
	# step: limit (s), least time left to start it
	declare -A LIMIT=([env]=120 [pytest]=120 [peak]=60 [sd15]=300 [extras]=300 [sdxl]=300)
	declare -A LEAST=([env]=10 [pytest]=10 [peak]=5 [sd15]=30 [extras]=30 [sdxl]=30)
	PEAK_ARGS=(--size 256 --seconds 0.05)
	SD15_ARGS=(--preset tiny --resolution 64 --images 4 --warmup-updates 1 --updates 2
		--peak-size 256 --peak-seconds 0.05 --timeout 240)
	SD15_BATCHES=(1) SD15_PRECISIONS=(no) EXTRA_BATCH=1 EXTRA_PRECISION=no
	SDXL_ARGS=(--arch sdxl --preset tiny --resolution 64 --images 4 --batch-sizes 1
		--precisions no --latents cached --warmup-updates 1 --updates 2 --peak-size 256
		--peak-seconds 0.05 --timeout 240)
else
	DEVICE=cuda THREADS=$(nproc) LOCK=requirements/cuda.lock PY=${PYTHON:-python3}
	WORK=${WORK:-/tmp/gpu_check}
	DEADLINE=${DEADLINE:-450}
	declare -A LIMIT=([env]=60 [pytest]=150 [peak]=30 [sd15]=300 [extras]=150 [sdxl]=180)
	declare -A LEAST=([env]=10 [pytest]=30 [peak]=10 [sd15]=60 [extras]=40 [sdxl]=60)
	PEAK_ARGS=(--size 8192 --seconds 2)
	# 32 images: batch 16 has two batches per epoch; the latent cache fills in a second.
	SD15_ARGS=(--preset sd15-shape --resolution 512 --images 32 --warmup-updates 5 --updates 20
		--timeout 150)
	SD15_BATCHES=(1 4 16) SD15_PRECISIONS=(fp16 bf16) EXTRA_BATCH=16 EXTRA_PRECISION=fp16
	# bf16: a random SDXL-sized UNet in fp16 may overflow, and the scaler would skip updates.
	SDXL_ARGS=(--arch sdxl --preset sdxl-shape --resolution 1024 --images 16 --batch-sizes 1 4
		--precisions bf16 --latents cached --warmup-updates 3 --updates 10 --timeout 150)
fi
for pair in ${LIMITS//,/ }; do LIMIT[${pair%%=*}]=${pair#*=}; done
mkdir -p "$WORK" || exit 2
WORK=$(cd "$WORK" && pwd)
SITE="$WORK/site"
LOG="$OUT/gpu_check.log"
: >"$WORK/steps.tsv"
# A step run again replaces what it wrote before; a step not run keeps it (a rerun of
# extras,sdxl reuses the sd15 calibration, and the report says which results are earlier).
declare -A WRITES=([env]="env.json" [peak]="peak.json" [sd15]="sd15.json"
	[extras]="xformers.json extras.json" [sdxl]="sdxl.json")
for s in ${STEPS//,/ }; do for f in ${WRITES[$s]:-}; do rm -f "$WORK/$f"; done; done

exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

export REPO OUT WORK WHEELS SITE PEER DRY DEVICE THREADS LOCK PY EXTRA_BATCH EXTRA_PRECISION
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
join() { (IFS=$'\x1f' && echo "$*"); }
PEAK_ARGS_S=$(join "${PEAK_ARGS[@]}") SD15_ARGS_S=$(join "${SD15_ARGS[@]}")
SD15_BATCHES_S=$(join "${SD15_BATCHES[@]}") SD15_PRECISIONS_S=$(join "${SD15_PRECISIONS[@]}")
SDXL_ARGS_S=$(join "${SDXL_ARGS[@]}")
export PEAK_ARGS_S SD15_ARGS_S SD15_BATCHES_S SD15_PRECISIONS_S SDXL_ARGS_S

cat >"$WORK/check.json" <<EOF
{"dry_run": $([ "$DRY" = 1 ] && echo true || echo false), "started": "$(date -u +%FT%TZ)",
 "host": "$(hostname)", "deadline_s": $DEADLINE, "steps_asked": "$STEPS", "peer": "${PEER:+$(sha256sum "$PEER" | cut -c1-12) $(basename "$PEER")}",
 "commit": "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"}
EOF
echo "gpu_check: $([ "$DRY" = 1 ] && echo 'dry run on the CPU' || echo "on $DEVICE"); out $OUT; work $WORK; deadline ${DEADLINE} s; steps $STEPS"
echo "peer script: ${PEER:-none (the diffusers runs are skipped: make gpu-wheels DIFFUSERS_SCRIPT=PATH)}"

# ---------------------------------------------------------------- the runner

START=$SECONDS
REPORT_RESERVE=10 # kept back for the last report and the log archive
FAILED=0
run_step() { # run_step NAME: in a child under timeout, unless too little time is left
	local name=$1 left limit t0 rc result
	left=$((DEADLINE - (SECONDS - START) - REPORT_RESERVE))
	if [ "$left" -lt "${LEAST[$name]}" ]; then
		echo "== $name: not run, ${left} s left of the ${DEADLINE} s deadline"
		printf '%s\t%s\t0\t\n' "$name" "not run (out of time)" >>"$WORK/steps.tsv"
		return
	fi
	limit=${LIMIT[$name]}
	[ "$left" -lt "$limit" ] && limit=$left
	echo "== $name: limit ${limit} s, at $((SECONDS - START)) s"
	t0=$SECONDS
	# The bench steps get a budget a little under the limit, so they stop between runs.
	timeout --kill-after=10 "$limit" "$SELF" --_step "$name" "$((limit * 9 / 10))"
	rc=$?
	case $rc in
	0) result=ok ;;
	124 | 137) result="cut off at ${limit} s" ;;
	*) result="failed (exit $rc)" ;;
	esac
	[ "$rc" = 0 ] || FAILED=1
	echo "== $name: $result in $((SECONDS - t0)) s"
	printf '%s\t%s\t%s\t%s\n' "$name" "$result" "$((SECONDS - t0))" "$limit" >>"$WORK/steps.tsv"
	# The report as it stands, should the call be cut off before the end.
	"$PY" scripts/gpu_check_report.py --work "$WORK" --out "$OUT" || true
}

for name in ${STEPS//,/ }; do run_step "$name"; done

"$PY" scripts/gpu_check_report.py --work "$WORK" --out "$OUT" || FAILED=1
[ -d "$WORK/bench/logs" ] && tar czf "$OUT/bench_logs.tar.gz" -C "$WORK/bench" logs
echo "gpu_check: done in $((SECONDS - START)) s; $OUT: $(cd "$OUT" && echo *)"
[ -f "$OUT/bench_gpu.md" ] && cat "$OUT/bench_gpu.md"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $FAILED
