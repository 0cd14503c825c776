#!/usr/bin/env bash
# One prepared check of visionlora's GPU path, within 8 minutes on one H100/H200:
#   1. install this checkout as the README says (pip install -e ".[train]", plus pytest and peft to test
#      with, and bitsandbytes); the machine's own CUDA torch is kept. Offline, wheels come from .whl/ when
#      it exists (without a bitsandbytes wheel there, its tests skip);
#   2. the tests marked gpu: the recipes in bf16/fp16 with resume, merge math on CUDA, torch.compile,
#      bitsandbytes bases;
#   3. scripts/bench.py --device cuda --compile: resnet50 at 224 px batch 64, then an SD-1.5-shaped UNet
#      at 64x64 latents batch 4, each eager and compiled, against PEFT;
#   4. every figure in one JSON file, $OUT/gpu_check.json ($OUT set) or ./gpu_check.json.
# Each phase has its own time limit (480 s in all), and the JSON is written whatever fails; the exit status is 1
# when a phase failed or a test did not pass.
#
#   bash scripts/gpu_check.sh            # on a CUDA machine
#   bash scripts/gpu_check.sh --smoke    # the same path on the CPU at toy sizes (install: pip --dry-run)
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; fi
out="${OUT:-.}"
mkdir -p "$out"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1

phase() {  # phase NAME SECONDS COMMAND...: run it under a time limit (twice as long for --smoke), record
    local name=$1 limit=$(($2 * (smoke + 1))) start rc  # its exit status and duration
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@"
    rc=$?
    echo "{\"phase\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - start))}" >>"$work/phases.jsonl"
    echo "== $name: exit $rc"
}

install=(-e ".[train]" pytest peft)
if [ ! -d .whl ] || ls .whl/bitsandbytes-* >/dev/null 2>&1; then install+=(bitsandbytes); fi  # else its tests skip
if [ -d .whl ]; then install=(--no-index --find-links .whl --no-build-isolation "${install[@]}"); fi
if [ "$smoke" = 1 ]; then install=(--dry-run --no-index --no-deps --no-build-isolation -e .); fi
phase install 60 "$python" -m pip install -q "${install[@]}"

if [ "$smoke" = 1 ]; then export VISIONLORA_GPU_TESTS=cpu; fi
phase tests 170 "$python" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$work/tests.xml" \
    tests/test_gpu.py tests/test_gpu_bnb.py tests/test_compat.py tests/train/test_gpu_recipes.py

if [ "$smoke" = 1 ]; then
    bench=(--device cpu --toy --compile-backend eager --repeats 1 --per-round 1)  # dynamo alone: the tests compile fully
else
    bench=(--device cuda --repeats 5 --per-round 2)
fi
phase bench-resnet 110 "$python" scripts/bench.py --only resnet --compile "${bench[@]}" --json "$work/bench-resnet.json"
phase bench-unet 140 "$python" scripts/bench.py --only unet --compile "${bench[@]}" --json "$work/bench-unet.json"

"$python" scripts/gpu_check_report.py "$work" "$out/gpu_check.json" $([ "$smoke" = 1 ] && echo --smoke)
