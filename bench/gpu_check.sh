#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step_* functions are called as "step_$name", unseen by shellcheck
# The GPU check of jdsearch: on a CUDA machine, in under 8 minutes, it runs
#   device       what torch sees: GPU names and memory, torch / CUDA / cuDNN versions
#   cuda-tests   python -m pytest -m cuda tests/test_cuda.py (CUDA vs CPU, AMP, KD, export, a search)
#   quickstart   studies/quickstart.yaml cut down (400 images, 4 trials) with device: cuda, amp: true,
#                through `jdsearch search`
#   throughput   r18-fpn and r50-fpn training images/s at 1333x800, fp32 and AMP, with peak memory
#                (bench/train_throughput.py --amp-compare)
#   kd-overhead  KD step against the plain step at 1333x800, r18-fpn with an r18 and an r50 teacher
#                (bench/kd_overhead.py)
#   latency      batch-1 FPS of the paper's base and upgraded presets (r18, r50, r101), as ratios
#                beside the paper's table-4 V100 ratios (bench/latency.py)
#   ddp          only with --ddp and at least 2 GPUs: jdsearch's data-parallel training on 2 GPUs
#                (torchrun, NCCL: DistributedDataParallel and batch norm over the global batch), its
#                images/s, and the weights and BN statistics equal on both ranks afterwards
# and ends with ONE table: step, what was measured, figures, pass/fail/skip, seconds. A failing
# step is recorded there and the others still run; logs and JSON results stay in --out.
#
# usage: bench/gpu_check.sh [--dry-run] [--ddp] [--time-limit SECONDS] [--out DIR]
#   --dry-run      the same steps on the CPU at toy sizes (tiny presets, small images, a few
#                  iterations, float32, the cuda tests skipped), about a minute: tests/test_gpu_check.py
#                  runs it so that this script cannot rot
#   --ddp          also run the 2-GPU step (with --dry-run: 2 CPU processes over gloo)
#   --time-limit   for all steps together (default 470 s; 240 s with --dry-run); a step that would
#                  start past it is skipped, a step that runs past it is stopped
#   --out DIR      logs and results (default runs/gpu_check, or runs/gpu_check-dry)
# Exit status: 0 when every step passed or was skipped, 1 when one failed, 2 for bad usage.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$REPO/bench/gpu_check.sh"
PY="${PYTHON:-python}"
SKIPPED=125 # exit status of a step that decided not to run (bench/gpu_check.py knows it too)

# ------------------------------------------------------------------------------------ the steps
# Each runs in its own process (`gpu_check.sh --step NAME`, under `timeout`), in the repository,
# with GC_OUT, GC_DRY and GC_DDP from the parent; it writes its result under $GC_OUT.

step_device() {
    "$PY" bench/gpu_check.py device --json "$GC_OUT/device.json" "${DRY[@]}"
}

step_cuda_tests() {
    "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py \
        --junitxml="$GC_OUT/cuda_tests.xml"
}

step_quickstart() {
    local dir="$GC_OUT/quickstart" spec threads=()
    if [[ $GC_DRY == 1 ]]; then threads=(--threads 1); fi
    spec="$("$PY" bench/gpu_check.py study --out "$dir" "${DRY[@]}")"
    (cd "$dir" && "$PY" -m jdsearch "${threads[@]}" search "$spec" --quiet)
    "$PY" bench/gpu_check.py study-summary --spec "$spec" --json "$GC_OUT/quickstart.json"
}

step_throughput() {
    local sizes=(--size 1333x800 --presets r18-fpn r50-fpn --device cuda --iters 10 --warmup 3)
    if [[ $GC_DRY == 1 ]]; then
        sizes=(--size 208x128 --presets tiny-r18-fpn tiny-r50-fpn --device cpu --iters 2 --warmup 1)
        sizes+=(--threads 1)
    fi
    "$PY" bench/train_throughput.py "${sizes[@]}" --batch-size 2 --amp-compare \
        --json "$GC_OUT/throughput.json"
}

step_kd_overhead() {
    local sizes=(--only r18 --size 1333x800 --device cuda --steps 10 --warmup 3)
    if [[ $GC_DRY == 1 ]]; then sizes=(--only tiny --steps 2 --warmup 1); fi
    "$PY" bench/kd_overhead.py "${sizes[@]}" --batch 2 --json "$GC_OUT/kd_overhead.json"
}

step_latency() {
    local sizes=(--pairs r18 r50 r101 --device cuda --warmup 10 --repeats 30)
    if [[ $GC_DRY == 1 ]]; then sizes=(--pairs tiny --warmup 1 --repeats 3); fi
    "$PY" bench/latency.py "${sizes[@]}" --onnx --json "$GC_OUT/latency.json"
}

step_ddp() {
    local gpus run=(--device cuda --preset r18-fpn --size 1333x800 --iters 10 --warmup 3)
    if [[ $GC_DDP != 1 ]]; then
        echo "not asked for (--ddp)" >"$GC_OUT/ddp.skip"
        return "$SKIPPED"
    fi
    if [[ $GC_DRY == 1 ]]; then
        run=(--device cpu --preset tiny-r18-fpn --size 208x128 --iters 2 --warmup 1)
    else
        gpus="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
        if ((gpus < 2)); then
            echo "needs 2 GPUs, found $gpus" >"$GC_OUT/ddp.skip"
            return "$SKIPPED"
        fi
    fi
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 bench/gpu_check.py ddp \
        "${run[@]}" --batch 2 --json "$GC_OUT/ddp.json"
}

if [[ ${1:-} == --step ]]; then # one step, in its own process
    cd "$REPO"
    DRY=()
    if [[ $GC_DRY == 1 ]]; then DRY=(--dry-run); fi
    "step_${2//-/_}"
    exit
fi

# ------------------------------------------------------------------------------------ options
usage() {
    sed -n '3,/^set -euo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}
GC_DRY=0 GC_DDP=0 LIMIT="" OUT=""
while (($#)); do
    case "$1" in
    --dry-run) GC_DRY=1 ;;
    --ddp) GC_DDP=1 ;;
    --time-limit)
        LIMIT="${2:?--time-limit needs seconds}"
        shift
        ;;
    --out)
        OUT="${2:?--out needs a folder}"
        shift
        ;;
    -h | --help) usage 0 ;;
    *)
        echo "gpu_check.sh: unknown option $1" >&2
        usage 2 >&2
        ;;
    esac
    shift
done
if [[ -n $LIMIT && ! $LIMIT =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: --time-limit takes whole seconds, got $LIMIT" >&2
    exit 2
fi
if [[ $GC_DRY == 1 ]]; then
    LIMIT="${LIMIT:-240}"
    OUT="${OUT:-$REPO/runs/gpu_check-dry}"
    export CUDA_VISIBLE_DEVICES="" # the CPU even on a GPU machine: the same run everywhere
    export OMP_NUM_THREADS=1       # tiny detectors gain nothing from more, and the cores are shared
else
    LIMIT="${LIMIT:-470}"
    OUT="${OUT:-$REPO/runs/gpu_check}"
fi

# The output folder: new, empty, or one this script wrote before (then its results are replaced).
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [[ -n "$(ls -A "$OUT")" && ! -f "$OUT/steps.tsv" ]]; then
    echo "gpu_check.sh: $OUT is neither empty nor an earlier gpu_check output; give another --out" >&2
    exit 2
fi
rm -rf "$OUT/steps.tsv" "$OUT"/*.log "$OUT"/*.json "$OUT"/*.skip "$OUT/cuda_tests.xml" "$OUT/quickstart"
: >"$OUT/steps.tsv"
export GC_OUT="$OUT" GC_DRY GC_DDP
cd "$REPO"

# ------------------------------------------------------------------------------------ run them
if [[ $GC_DRY == 1 ]]; then
    echo "gpu_check.sh --dry-run: every step on the CPU at toy sizes, float32; results in $OUT"
    declare -A WHAT=(
        [device]="what torch sees (dry run: the CPU)"
        [cuda-tests]="pytest -m cuda tests/test_cuda.py (no GPU: skip)"
        [quickstart]="quickstart cut down: 32 images, 3 trials, CPU fp32"
        [throughput]="training img/s, tiny-r18/r50-fpn 208x128, fp32"
        [kd-overhead]="KD step / plain step, tiny-r18-fpn, 2 teachers"
        [latency]="batch-1 FPS, tiny-r18-fpn 208x128 vs 176x112"
        [ddp]="jdsearch data-parallel training, tiny-r18-fpn, 2 CPU procs (gloo)"
    )
    declare -A CAP=([device]=30 [cuda-tests]=90 [quickstart]=120 [throughput]=60 [kd-overhead]=60 [latency]=60 [ddp]=90)
else
    echo "gpu_check.sh: CUDA check, at most $LIMIT s; results in $OUT"
    declare -A WHAT=(
        [device]="GPU, torch / CUDA / cuDNN versions"
        [cuda-tests]="pytest -m cuda tests/test_cuda.py"
        [quickstart]="quickstart cut down: 400 images, 4 trials, cuda AMP"
        [throughput]="training img/s, r18/r50-fpn 1333x800, fp32 vs AMP, peak mem"
        [kd-overhead]="KD step / plain step, r18-fpn 1333x800, r18/r50 teacher"
        [latency]="batch-1 FPS, paper base vs upgraded r18/r50/r101"
        [ddp]="jdsearch data-parallel training, r18-fpn 1333x800 on 2 GPUs"
    )
    declare -A CAP=([device]=60 [cuda-tests]=150 [quickstart]=210 [throughput]=120 [kd-overhead]=90 [latency]=120 [ddp]=120)
fi

ABORT=""
run_step() {
    local name="$1" what="${WHAT[$1]}" cap="${CAP[$1]}" rc=0 t0 t1 left budget
    t0="$(date +%s.%N)"
    left=$((LIMIT - SECONDS - 5))
    if [[ -n $ABORT ]]; then
        echo "$ABORT" >"$OUT/$name.skip"
        rc=$SKIPPED
    elif ((left < 10)); then
        echo "time limit: not run, the $LIMIT s were spent" >"$OUT/$name.skip"
        rc=$SKIPPED
    else
        budget=$((cap < left ? cap : left))
        printf '== %-11s %s (at most %d s)\n' "$name" "$what" "$budget"
        timeout -k 10 "$budget" "$BASH" "$SELF" --step "$name" >"$OUT/$name.log" 2>&1 || rc=$?
    fi
    t1="$(date +%s.%N)"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$t0" "$t1" "$what" >>"$OUT/steps.tsv"
    if ((rc == SKIPPED)); then
        echo "   skipped: $(cat "$OUT/$name.skip" 2>/dev/null || true)"
    elif ((rc != 0)); then
        echo "   FAILED (exit status $rc$( ((rc == 124)) && echo ': timed out')); the end of $OUT/$name.log:"
        tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
    fi
    return 0
}

run_step device
if [[ -f "$OUT/device.log" ]]; then sed 's/^/   /' "$OUT/device.log"; fi
if [[ $GC_DRY != 1 ]] && ! grep -q '"ok": true' "$OUT/device.json" 2>/dev/null; then
    ABORT="no usable CUDA device (see the device step)"
fi
for name in cuda-tests quickstart throughput kd-overhead latency ddp; do
    run_step "$name"
done

echo
DRY=()
if [[ $GC_DRY == 1 ]]; then DRY=(--dry-run); fi
rc=0
"$PY" bench/gpu_check.py table --out "$OUT" "${DRY[@]}" || rc=$?
if ((rc > 1)); then # the table itself failed: the raw record, so that nothing is lost
    echo "gpu_check.sh: could not print the table (exit status $rc); the raw record:"
    cat "$OUT/steps.tsv"
    rc=1
fi
exit "$rc"
