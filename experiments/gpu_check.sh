#!/usr/bin/env bash
# The GPU checks, as one command of under 10 minutes on a machine with one CUDA GPU and
# PyTorch installed (no network needed), from the repository root:
#
#   mkdir -p .gpu && cp -r /usr/share/datasets/fashion-mnist .gpu/   # on a machine that has it
#   bash experiments/gpu_check.sh OUT
#
# What it writes to OUT: env.txt (GPU, driver, torch), tests.log (the GPU tests and the
# single-process training tests, all on the GPU), bench_eager.json and bench_compiled.json
# (ResNet-50, bf16, channels_last, synthetic data; docs/BENCHMARKS.md, "GPU"), and
# study_b672_summary.json and _metrics.jsonl (one 12-epoch run of the critical-batch
# study's batch 672, to set beside the CPU's). Each step has its own time limit, so a
# step that hangs costs only its share and the others still report. EPOCHS and BATCH
# shrink the study run and the benchmark (to try the script where there is no GPU).
set -u
OUT=${1:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LARGEBATCH_FMNIST_DIR=${LARGEBATCH_FMNIST_DIR:-$PWD/.gpu/fashion-mnist}
PY=${PYTHON:-python3}
EPOCHS=${EPOCHS:-12} BATCH=${BATCH:-128}
SCRATCH=$(mktemp -d)

{ nvidia-smi -L; nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step() {  # step SECONDS NAME COMMAND...: run with a time limit, say how it ended
    local limit=$1 name=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@"
    echo "== $name: exit $? after $((SECONDS - t0)) s (limit $limit s)"
}

step 170 tests $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_train.py \
    tests/test_noise_scale.py 2>&1 | tee "$OUT/tests.log" | tail -15

BENCH=(-m largebatch bench --model resnet50 --batch "$BATCH" --dtype bf16 --channels-last --steps 20 --warmup 5 --repeats 3)
step 90 bench-eager $PY "${BENCH[@]}" --out "$OUT/bench_eager.json"

step 130 study-b672 $PY -m largebatch train --recipe fmnist-baseline --global-batch 672 --micro-batch 224 \
    --epochs "$EPOCHS" --set schedule.peak_lr=0.7947 --set schedule.warmup_epochs=0.861 --set schedule.warmup_start=0.0 \
    --set schedule.decay=cosine --set model.zero_init_gamma=none --set train.seed=0 \
    --set train.eval_every_epochs=0.5 --set train.eval_batch=2000 --set train.log_every_steps=5 \
    --out "$SCRATCH/study_b672" 2>&1 | tail -15
cp "$SCRATCH/study_b672/summary.json" "$OUT/study_b672_summary.json"
cp "$SCRATCH/study_b672/metrics.jsonl" "$OUT/study_b672_metrics.jsonl"

step 180 bench-compiled $PY "${BENCH[@]}" --compile --out "$OUT/bench_compiled.json"
