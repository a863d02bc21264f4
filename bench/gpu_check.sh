#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR [--dry-run]
#
# The one GPU check, for the day a GPU machine is lent (docs: bench/README.md, "GPU check").
# On the device, from the repository root, in at most ~8 minutes on an H100/H200:
#   1. records the machine (GPU, driver, nvcc, torch, CuPy) and the source hash of the GPU path
#   2. makes a carried bitsandbytes importable (bench/.site from prepare_gpu_bitsandbytes.sh,
#      or a wheel in .whl/), for the side-by-side benchmarks
#   3. builds the extension and the fatbins in place (nvcc, for the device's architecture)
#   4. runs the CUDA test suite (pytest -m cuda)
#   5. runs every GPU benchmark against bitsandbytes (bench/bench_*.py --device cuda)
#   6. runs compute-sanitizer memcheck and racecheck over a fast subset of the suite
# and writes into OUTDIR: gpu_check.json (the summary: one entry per step with status, exit
# code, seconds; the GPU; the source hash that `python -m bnbcy` matches), gpu_check.txt (the
# same for people, with the tail of every failed step's log) and logs.tar.gz (every log, the
# junit XML and the benchmark JSON). Three files, since the device tool returns at most eight.
# Commit gpu_check.json as bench/results/gpu_check-<date>-<gpu>.json (the name is printed).
#
# Every step has its own timeout, capped by what is left of the total budget; a failing or
# timed-out step is recorded and the next one runs. GPU-only steps need a GPU: on a machine
# without one the script stops at the first of them and records the rest as not run (exit 2).
# --dry-run prints the steps and their commands and runs nothing.
#
# Environment: PYTHON (default python3), BNBCY_GPU_CHECK_BUDGET_S (total, default 470),
# BNBCY_SANITIZE_TESTS (pytest arguments of the sanitizer subset), BNBCY_BENCH_ARGS (extra
# arguments of every benchmark), BNBCY_CUDA_ARCHS (default: the device's architecture).
set -u
set -o pipefail

usage() { echo "usage: bash bench/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 64; }
[ $# -ge 1 ] || usage
OUTDIR=$1; shift
DRY=0
for a in "$@"; do
    case $a in
        --dry-run) DRY=1 ;;
        *) usage ;;
    esac
done
case $OUTDIR in -*) usage ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
BUDGET=${BNBCY_GPU_CHECK_BUDGET_S:-470}
# one test file per kernel module: under the sanitizers every launch is 10-100x slower
SANITIZE_TESTS=${BNBCY_SANITIZE_TESTS:-"tests/test_blockwise_numerics.py tests/test_fourbit_cuda.py tests/test_int8_cuda.py tests/test_optim_cuda.py"}
BENCH_ARGS=${BNBCY_BENCH_ARGS:-"--repeats 10 --warmup 2"}
START=$(date +%s)
LOGS="$OUTDIR/logs"
STEPS="$LOGS/steps.tsv"

if [ "$DRY" = 0 ]; then
    mkdir -p "$LOGS" || exit 1
    OUTDIR=$(cd "$OUTDIR" && pwd); LOGS="$OUTDIR/logs"; STEPS="$LOGS/steps.tsv"
    : > "$STEPS"
fi

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

have_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
        "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1
}

GPU=none
NO_GPU_STOP=0   # set once a GPU-only step found no GPU: every later step is "not run"

# step NAME TIMEOUT_S GPU_ONLY(0|1) COMMAND...  -- run one step, record it, never exit.
step() {
    local name=$1 limit=$2 gpu_only=$3; shift 3
    local cmd="$*"
    if [ "$DRY" = 1 ]; then
        printf '%-16s timeout %4ss  %s  %s\n' "$name" "$limit" "$([ "$gpu_only" = 1 ] && echo GPU || echo any)" "$cmd"
        return 0
    fi
    local logf="$LOGS/$name.log" status rc t0 t1 left
    if [ "$NO_GPU_STOP" = 1 ]; then
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "not-run" "-" 0 "$limit" "$gpu_only" >> "$STEPS"
        return 0
    fi
    if [ "$gpu_only" = 1 ] && [ "$GPU" = none ]; then
        log "$name needs a GPU and this machine has none: stopping here"
        NO_GPU_STOP=1
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "not-run" "-" 0 "$limit" "$gpu_only" >> "$STEPS"
        return 0
    fi
    left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$left" -lt 5 ]; then
        log "$name: out of time (budget ${BUDGET}s)"
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "out-of-time" "-" 0 "$limit" "$gpu_only" >> "$STEPS"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    log "$name (timeout ${limit}s): $cmd"
    t0=$(date +%s)
    # timeout signals its whole process group, so the children (nvcc, pytest) end with the step
    timeout --signal=TERM --kill-after=10 "$limit" bash -c "$cmd" > "$logf" 2>&1 < /dev/null
    rc=$?
    t1=$(date +%s)
    case $rc in
        0) status=passed ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    log "$name: $status (rc $rc, $(( t1 - t0 ))s)"
    [ "$status" = passed ] || tail -n 15 "$logf" | sed 's/^/    | /'
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( t1 - t0 ))" "$limit" "$gpu_only" >> "$STEPS"
    return 0
}

if [ "$DRY" = 0 ]; then
    if have_gpu; then
        GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
        CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
    else
        CC=""
    fi
    log "GPU: $GPU; output: $OUTDIR; budget ${BUDGET}s"
else
    CC="<device cc>"
    echo "dry run: steps of bench/gpu_check.sh (budget ${BUDGET}s in all)"
fi
ARCHS=${BNBCY_CUDA_ARCHS:-${CC:-90}}

# bitsandbytes: a carried copy goes first on the path (the GPU machine has none installed)
BNB_SITE=""
if [ -d "$ROOT/bench/.site/bitsandbytes" ]; then
    BNB_SITE="$ROOT/bench/.site"
elif compgen -G "$ROOT/.whl/bitsandbytes-*.whl" > /dev/null; then
    BNB_SITE="${TMPDIR:-/tmp}/bnbcy-gpu-check-site"
fi
export PYTHONPATH="$ROOT${BNB_SITE:+:$BNB_SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

step environment 30 0 "date -u; uname -a; nvidia-smi || true; nvcc --version || true; \
compute-sanitizer --version || true; $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)'; \
$PY -c 'import cupy; print(\"cupy\", cupy.__version__)' || true; $PY bnbcy/_gpu_evidence.py"

if [ -n "$BNB_SITE" ] && [ "$BNB_SITE" != "$ROOT/bench/.site" ]; then
    step bitsandbytes 60 0 "$PY -m pip install -q --no-index --no-deps --target '$BNB_SITE' $ROOT/.whl/bitsandbytes-*.whl \
&& $PY -c 'import bitsandbytes; print(bitsandbytes.__version__, bitsandbytes.__file__)'"
else
    step bitsandbytes 30 0 "$PY -c 'import bitsandbytes; print(bitsandbytes.__version__, bitsandbytes.__file__)'"
fi

step build 150 0 "BNBCY_CUDA_ARCHS='$ARCHS' $PY setup.py build_ext --inplace && \
$PY -c 'import bnbcy.kernels as K; print(K.registry.manifest)'"

step features 30 1 "$PY -c 'import bnbcy, json; print(json.dumps(bnbcy.features(), indent=1))' && \
$PY -c 'import torch; torch.zeros(1, device=\"cuda\"); print(torch.cuda.get_device_name())'"

step cuda-tests 120 1 "BNBCY_CUDA_SYNC=1 $PY -m pytest -q -m cuda tests -rs -p no:cacheprovider \
--junitxml='$LOGS/cuda-tests.xml'"

# every GPU benchmark against bitsandbytes (before the sanitizers, which are the likeliest to
# run out of time)
for b in bench/bench_*.py; do
    n=$(basename "$b" .py)
    step "$n" 45 1 "$PY $b --device cuda $BENCH_ARGS --json '$LOGS/$n.json'"
done

# the sanitizers: torch's caching allocator off, so memcheck sees every allocation's bounds
step memcheck 60 1 "BNBCY_CUDA_SYNC=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
--error-exitcode 99 --print-limit 100 $PY -m pytest -q -m cuda -p no:cacheprovider $SANITIZE_TESTS"

step racecheck 60 1 "BNBCY_CUDA_SYNC=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck \
--racecheck-report hazard --error-exitcode 99 --print-limit 100 $PY -m pytest -q -m cuda -p no:cacheprovider $SANITIZE_TESTS"


[ "$DRY" = 1 ] && exit 0

# ----------------------------------------------------------------------------- summary
ELAPSED=$(( $(date +%s) - START ))
"$PY" - "$OUTDIR" "$GPU" "$ELAPSED" "$BUDGET" <<'EOF'
import glob, json, os, subprocess, sys, time
out, gpu, elapsed, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
logs = os.path.join(out, "logs")
steps = []
with open(os.path.join(logs, "steps.tsv")) as fh:
    for line in fh:
        name, status, rc, secs, limit, gpu_only = line.rstrip("\n").split("\t")
        steps.append({"name": name, "status": status, "rc": None if rc == "-" else int(rc),
                      "seconds": int(secs), "timeout_s": int(limit), "gpu_only": gpu_only == "1",
                      "log": f"logs/{name}.log"})
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
except Exception:
    commit = os.environ.get("BNBCY_COMMIT")
src = subprocess.run([sys.executable, "bnbcy/_gpu_evidence.py", "--source-hash"], capture_output=True,
                     text=True).stdout.strip() or None
bench = {}
for path in sorted(glob.glob(os.path.join(logs, "bench_*.json"))):
    try:
        with open(path) as fh:
            data = json.load(fh)
        bench[os.path.basename(path)[:-5]] = {"bars": data.get("bars"), "cases": len(data.get("cases", []))}
    except (OSError, ValueError) as exc:
        bench[os.path.basename(path)[:-5]] = {"error": str(exc)}
date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
summary = {"tool": "bench/gpu_check.sh", "date_utc": date, "gpu": gpu, "commit": commit, "source_hash": src,
           "elapsed_s": elapsed, "budget_s": budget, "steps": steps,
           "passed": bool(steps) and all(s["status"] == "passed" for s in steps), "bench": bench}
slug = "".join(c if c.isalnum() else "-" for c in gpu).strip("-").lower() or "none"
summary["commit_as"] = f"bench/results/gpu_check-{date}-{slug}.json"
with open(os.path.join(out, "gpu_check.json"), "w") as fh:
    json.dump(summary, fh, indent=1)
lines = [f"bnbcy GPU check: {gpu}, {date}, source {src and src[:12]}, commit {commit}, {elapsed}s of {budget}s",
         ""] + [f"  {s['name']:<16} {s['status']:<11} rc={s['rc']}  {s['seconds']:>4}s / {s['timeout_s']}s"
                for s in steps]
for s in steps:
    if s["status"] not in ("passed", "not-run", "out-of-time"):
        with open(os.path.join(logs, f"{s['name']}.log"), errors="replace") as fh:
            tail = fh.read().splitlines()[-40:]
        lines += ["", f"--- {s['name']} ({s['status']}), last lines:"] + tail
lines += ["", f"commit the summary as {summary['commit_as']}"]
with open(os.path.join(out, "gpu_check.txt"), "w") as fh:
    fh.write("\n".join(lines) + "\n")
print("\n".join(lines[:len(steps) + 2]))
print(f"summary: {os.path.join(out, 'gpu_check.json')}; commit it as {summary['commit_as']}")
EOF
tar -czf "$OUTDIR/logs.tar.gz" -C "$OUTDIR" logs && rm -rf "$LOGS"
if [ "$NO_GPU_STOP" = 1 ]; then
    log "no GPU: stopped at the first GPU-only step (exit 2)"
    exit 2
fi
grep -q '"passed": true' "$OUTDIR/gpu_check.json" && exit 0
exit 1
