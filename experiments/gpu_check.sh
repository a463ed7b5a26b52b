#!/usr/bin/env bash
# The GPU checks, on a machine with one CUDA GPU and PyTorch installed (no network
# needed), from the repository root; all steps take about 20 minutes on an H200 (ONLY,
# below, picks some):
#
#   mkdir -p .gpu && cp -r /usr/share/datasets/fashion-mnist .gpu/   # on a machine that has it
#   mkdir -p .gpu/timm && cp -r PYTORCH_IMAGE_MODELS/{train.py,timm} .gpu/timm/   # for vs-timm
#   bash experiments/gpu_check.sh OUT [ARCHIVE.tgz]
#
# What it writes to OUT: env.txt (GPU, driver, torch), tests.out (the GPU tests, the BN
# group tests, and the single-process training, ensemble, reliability and checkpoint
# tests, all on the GPU); bench_groups.json
# (ResNet-50, bf16, channels_last, synthetic data, BN over groups of 32, deterministic
# algorithms as in training), bench_groups_fastest.json and bench_plain_bn_fastest.json
# (cuDNN's fastest algorithms; BN over groups of 32 and over the whole batch),
# bench_groups_baseline.json (as bench_groups.json, with BASELINE's package),
# bench_groups_gathered_{native,functional}.json (as bench_groups.json, the groups
# gathered into one call per layer, two ways), bench_compiled.json (the first with
# torch.compile); bn_group_forms.json (the ways to normalise groups of 32 in
# bn_group_forms.py, timed on the BN inputs of a ResNet-50 step); optimizer_step.json
# (one SGD and LARS step over ResNet-50's parameters, and one commit of its BN statistics,
# per implementation, with the operations each issues);
# study_b672_summary.json and _metrics.jsonl (one 12-epoch run of the critical-batch
# study's batch 672, to set beside the CPU's); e2e_shards_* and e2e_folder_* (ResNet-50
# trained end to end from tar shards and from a JPEG folder: summary and per-step
# metrics); vs_timm.json (ResNet-50 from the same JPEG tree, largebatch beside timm's
# train.py on the GPU: experiments/vs_timm.py); and *.out, each step's output. With
# ARCHIVE, OUT is packed into it after each step, so that what finished comes back as one
# file even if the command is stopped. Each step has its own time limit, so a step that
# hangs costs only its share and the others still report. ONLY="tests bench-groups ..."
# runs the steps named. EPOCHS, BATCH, BENCH_STEPS and E2E_STEPS shrink the runs (to try
# the script where there is no GPU); TEST_WORKERS=N runs the tests in N processes
# (pytest-xdist), TESTS="FILE ..." runs those test files, TESTS_LIMIT its time limit.
set -u
OUT=${1:-gpu-check}
ARCHIVE=${2:-}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LARGEBATCH_FMNIST_DIR=${LARGEBATCH_FMNIST_DIR:-$PWD/.gpu/fashion-mnist}
PY=${PYTHON:-python3}
EPOCHS=${EPOCHS:-12} BATCH=${BATCH:-256} E2E_STEPS=${E2E_STEPS:-40} BENCH_STEPS=${BENCH_STEPS:-20}
SCRATCH=$(mktemp -d)
WORKERS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))  # loader processes: the cores but the trainer's
TIMM=${TIMM:-$PWD/.gpu/timm}  # a checkout of pytorch-image-models (train.py and timm/ suffice)
export OUT SCRATCH PY BATCH E2E_STEPS WORKERS TIMM

{ nvidia-smi -L; nvidia-smi --query-gpu=driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader
  nproc
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step() {  # step SECONDS NAME COMMAND...: run with a time limit, its output in OUT/NAME.out
    # (a shell function of this script runs as: step SECONDS NAME bash -c FUNCTION)
    local limit=$1 name=$2; shift 2
    [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.out" 2>&1
    local rc=$?
    tail -12 "$OUT/$name.out"
    echo "== $name: exit $rc after $((SECONDS - t0)) s (limit $limit s)"
    [ -z "$ARCHIVE" ] || tar czf "$ARCHIVE" -C "$OUT" .
}

# one process per GPU: the two-process Ctrl-C test needs a second GPU
TESTS=${TESTS:-tests/test_cuda.py tests/test_models.py tests/test_train.py tests/test_noise_scale.py \
    tests/test_ensemble.py tests/test_reliability.py tests/test_checkpoint.py tests/test_lars.py}
step "${TESTS_LIMIT:-200}" tests $PY -m pytest -q ${TEST_WORKERS:+-n $TEST_WORKERS} --maxfail=5 -p no:cacheprovider \
    -W ignore::DeprecationWarning $TESTS --deselect "tests/test_reliability.py::test_ctrl_c_checkpoints_and_exits_130[2]"

BENCH=(-m largebatch bench --model resnet50 --batch "$BATCH" --dtype bf16 --channels-last --steps "$BENCH_STEPS" --warmup 5 --repeats 3)
step 60 bench-groups $PY "${BENCH[@]}" --out "$OUT/bench_groups.json"
step 60 bench-groups-fastest $PY "${BENCH[@]}" --nondeterministic --out "$OUT/bench_groups_fastest.json"
# the same with an earlier commit's largebatch package (BASELINE: a folder holding it), for
# a before-and-after on one machine (run from there: the workers import from their folder)
[ -z "${BASELINE:-}" ] || step 60 bench-groups-baseline env -C "$BASELINE" PYTHONPATH="$BASELINE" $PY "${BENCH[@]}" \
    --out "$OUT/bench_groups_baseline.json"
# the same with the BN groups gathered into one call per layer (bn_group_forms.GatheredFn,
# with aten's native kernels, and with F.batch_norm's: cuDNN's), switched on in bench's
# worker processes by a sitecustomize.py on their PYTHONPATH
for fn in native functional; do
    mkdir -p "$SCRATCH/gathered_$fn"
    echo "import bn_group_forms; bn_group_forms.use_gathered_function_in_layer(functional=$([ $fn = functional ] \
        && echo True || echo False))" > "$SCRATCH/gathered_$fn/sitecustomize.py"
    step 60 bench-groups-gathered-$fn env PYTHONPATH="$SCRATCH/gathered_$fn:$PWD/experiments:$PYTHONPATH" \
        $PY "${BENCH[@]}" --out "$OUT/bench_groups_gathered_$fn.json"
done
step 60 bench-plain-bn-fastest $PY "${BENCH[@]}" --bn-group-size 0 --nondeterministic --out "$OUT/bench_plain_bn_fastest.json"
step 90 bn-group-forms $PY experiments/bn_group_forms.py --batch "$BATCH" --group $(( BATCH < 64 ? BATCH / 2 : 32 )) \
    --out "$OUT/bn_group_forms.json"
step 60 optimizer-step $PY experiments/optimizer_step.py --out "$OUT/optimizer_step.json"

step 100 study-b672 $PY -m largebatch train --recipe fmnist-baseline --global-batch 672 --micro-batch 224 \
    --epochs "$EPOCHS" --set schedule.peak_lr=0.7947 --set schedule.warmup_epochs=0.861 --set schedule.warmup_start=0.0 \
    --set schedule.decay=cosine --set model.zero_init_gamma=none --set train.seed=0 \
    --set train.eval_every_epochs=0.5 --set train.eval_batch=2000 --set train.log_every_steps=5 \
    --out "$SCRATCH/study_b672"
cp "$SCRATCH/study_b672/summary.json" "$OUT/study_b672_summary.json" 2>/dev/null
cp "$SCRATCH/study_b672/metrics.jsonl" "$OUT/study_b672_metrics.jsonl" 2>/dev/null

e2e() {  # ResNet-50 from the tree's shards or its folder, every step logged
    $PY experiments/make_jpeg_tree.py "$SCRATCH/tree" --per-class 260 > /dev/null || return
    [ -d "$SCRATCH/shards" ] || $PY -m largebatch pack "$SCRATCH/tree" "$SCRATCH/shards" --resize-shorter 256 || return
    for src in shards folder; do
        local data=$SCRATCH/tree extra=()
        [ $src = shards ] && data=$SCRATCH/shards extra=(--set data.name=shards)
        $PY -m largebatch train --recipe goyal-8k --data "$data" "${extra[@]}" --global-batch "$BATCH" \
            --micro-batch "$BATCH" --steps "$E2E_STEPS" --set data.workers=$WORKERS --set train.log_every_steps=1 \
            --set schedule.warmup_epochs=0.01 --set train.eval_every_epochs=0 --out "$SCRATCH/e2e_$src" || return
        cp "$SCRATCH/e2e_$src/summary.json" "$OUT/e2e_${src}_summary.json"
        cp "$SCRATCH/e2e_$src/metrics.jsonl" "$OUT/e2e_${src}_metrics.jsonl"
        cp "$SCRATCH/e2e_$src/config.yaml" "$OUT/e2e_${src}_config.yaml"
    done
}
export -f e2e
step 130 e2e bash -c e2e

step 140 bench-compiled $PY "${BENCH[@]}" --compile --out "$OUT/bench_compiled.json"

vs_timm() {  # largebatch beside timm's train.py on the GPU: same settings, and each tool's defaults
    [ -f "$TIMM/train.py" ] || { echo "no timm checkout at $TIMM"; return 1; }
    $PY experiments/vs_timm.py --timm "$TIMM" --device cuda --batch "$BATCH" --workers "$WORKERS" \
        --steps "$E2E_STEPS" --defaults-batch "$BATCH" --per-class 260 --tree "$SCRATCH/vs_timm" --rounds 1 \
        --only "timm same" "largebatch same" "largebatch shards same" "timm defaults" "largebatch defaults" \
        --out "$OUT/vs_timm.json"
}
export -f vs_timm
step 300 vs-timm bash -c vs_timm  # five variants at batch 256: 180 s ran four
