#!/usr/bin/env bash
# The one-call GPU check (`make gpu-check`): everything wtours wants to know from a GPU, in one run of <= 9 minutes.
#
# On the device machine (a copy of the repository, the wheels of `make gpu-wheels` carried in gpu-wheels/):
#     bash scripts/gpu_check.sh                     # results: $OUT/gpu_check.tgz, $OUT/summary.md, $OUT/log.txt
# Here, on CPU, the same phases at toy sizes in under 2 minutes (tests/test_gpu_check.py runs it):
#     GPU_CHECK_DRY=1 OUT=/tmp/gpu-out bash scripts/gpu_check.sh
#
# Phases, each under its own `timeout` taken from what is left of GPU_CHECK_BUDGET (seconds, default 540) and each
# packed into $OUT/gpu_check.tgz as soon as it ends, so a phase that fails or hangs costs only its own slot:
#   env        torch / CUDA / device, and the wheels of gpu-wheels/ installed with --no-deps into a private folder
#              (the machine has torch, timm and lightning but no av, kornia, scikit-video, torchsort, decord, pot);
#              torchsort is built there from its source in the background (nvcc is there)
#   cuda_tests the tests marked `cuda` (bf16 step without host syncs, eval oracle on the device)
#   bench_train `wtours bench train` of the paper recipes video/dora_vits16 and video/dora_timet_vits16
#   learn      the GPU-scale learning proof: the proof recipe with batch GPU_LEARN_BATCH on a longer synthetic tour,
#              its step count derived from a measured calibration step so that 3 seeds in parallel fit their slot
#              (and `--time-limit` cuts a seed that would still overrun: it is then evaluated as it stands), then
#              `wtours bench learn` over the three seeds: every instrument the bench has, trained vs random
#   bench_neco `wtours bench neco --config neco/neco_vits16` (bitonic, odd-even; torchsort if its build finished)
#   bench_eval `wtours bench eval` on a DAVIS-sized synthetic set (30 x 70 frames at 854x480; goal <= 60 s)
#   suite      the whole test suite with CUDA present (pytest-xdist workers; tests/test_sinkhorn.py, the POT oracle,
#              is left out when POT is missing)
# Then scripts/gpu_check_summary.py writes $OUT/summary.md: one table of every figure, and which phases failed.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=${GPU_CHECK_DRY:-0}
OUT=${OUT:-$REPO/runs/gpu-check/out}
WORK=${GPU_CHECK_WORK:-$REPO/runs/gpu-check}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd); WORK=$(cd "$WORK" && pwd)
ST=$WORK/results          # what is packed: JSON / logs / csv of every phase
rm -rf "$ST"; mkdir -p "$ST"
T0=$(date +%s)
now() { echo $(( $(date +%s) - T0 )); }
say() { echo "=== [$(now) s] $*"; }
# left WANT [RESERVE]: WANT seconds, or what is left of the budget minus RESERVE when that is less (at least 5);
# both are seconds of the real 540-s plan, scaled by BUDGET / 540 (the dry run's budget is smaller)
left() {
  local w=$(( $1 * BUDGET / 540 )) r=$(( ${2:-0} * BUDGET / 540 ))
  local l=$(( BUDGET - $(now) - r ))
  if [ "$l" -lt "$w" ]; then echo $(( l < 5 ? 5 : l )); else echo "$w"; fi
}
phase_rc() { echo "$1 $2 $(now)" >> "$ST/phases.txt"; }   # name, exit status, seconds since start
pack() { (cd "$ST" && tar czf "$OUT/gpu_check.tgz.tmp" . && mv "$OUT/gpu_check.tgz.tmp" "$OUT/gpu_check.tgz") 2>/dev/null; }
exec > >(tee -a "$OUT/log.txt") 2>&1

if [ "$DRY" = 0 ]; then
  PY=${PY:-python3}
  BUDGET=${GPU_CHECK_BUDGET:-540}
  BT_CONFIGS="video/dora_vits16 video/dora_timet_vits16"; BT_STEPS=10; BT_SETS=()
  LEARN_BATCH=${GPU_LEARN_BATCH:-128}; LEARN_TOUR_S=600; LEARN_WORKERS=4; TRAIN_S=${GPU_LEARN_SECONDS:-170}
  NMIN=100; NMAX=20000; CALIB_STEPS=20; LEARN_SETS=(); LEARN_EVAL=()
  LEARN_THREADS=4   # 3 seeds in parallel on 16 cores, each with 4 loader workers
  NECO_ARGS=(--config neco/neco_vits16 --sorters bitonic odd_even --steps 3)
  EVAL_ARGS=(--sequences 30 --frames 70)
  SUITE_ARGS=(-n 12 tests)
else
  PY=${PY:-$REPO/.venv/bin/python}
  BUDGET=${GPU_CHECK_BUDGET:-540}   # the same limits: toy sizes end long before them
  BT_CONFIGS="video/proof video/proof_dora_timet"; BT_STEPS=1
  BT_SETS=(--set data.batch_size=2 --set data.synth.seconds=8 --set data.synth.sequences=0 --set data.num_workers=0)
  LEARN_BATCH=2; LEARN_TOUR_S=8; LEARN_WORKERS=0; TRAIN_S=4
  NMIN=2; NMAX=3; CALIB_STEPS=1
  LEARN_SETS=(--set data.synth.sequences=2 --set data.synth.seq_frames=4)
  LEARN_EVAL=(--eval-set repeats=1 --eval-set restarts=1 --eval-set niter=5)
  LEARN_THREADS=1   # 3 processes on 2 cores: more intra-op threads only make them wait for each other
  NECO_ARGS=(--config neco/tiny --sorters bitonic --steps 1 --batch 2 --no-step)
  EVAL_ARGS=(--sequences 2 --frames 3 --arch vit_nano_patch8_64)
  SUITE_ARGS=(tests/test_eval_metrics.py)
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 WTOURS_CACHE=$WORK/cache
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
WT=("$PY" -m wtours.cli)
say "gpu check: dry=$DRY budget=${BUDGET}s repo=$REPO out=$OUT"

# ------------------------------------------------------------------------------------------------- env
say "env"
if [ "$DRY" = 0 ] && ls gpu-wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/wtours-site \
    gpu-wheels/*.whl > "$ST/wheels.log" 2>&1 && export PYTHONPATH=$PYTHONPATH:/tmp/wtours-site \
    || echo "wheels: install failed (see wheels.log)"
fi
TS_PID=""
if [ "$DRY" = 0 ] && ls gpu-wheels/torchsort-*.tar.gz >/dev/null 2>&1; then
  # torchsort ships as source: build it against this machine's torch while the other phases run
  ( timeout 300 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
      --target /tmp/wtours-torchsort gpu-wheels/torchsort-*.tar.gz ) > "$ST/torchsort_build.log" 2>&1 &
  TS_PID=$!
fi
{ nproc; free -g | head -2; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
  git -C "$REPO" rev-parse HEAD 2>/dev/null; } > "$ST/machine.txt" 2>&1
timeout 60 "$PY" - > "$ST/env.json" 2> "$ST/env.err" <<'EOF'
import importlib, json, platform, torch
mods = {}
for name in ("timm", "lightning", "av", "kornia", "skvideo", "decord", "ot", "torchsort", "numpy", "scipy", "matplotlib"):
    try:
        mods[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as e:  # noqa: BLE001
        mods[name] = f"missing ({type(e).__name__})"
cuda = torch.cuda.is_available()
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": cuda,
                  "cuda_version": torch.version.cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                  "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
                  "bf16": torch.cuda.is_bf16_supported() if cuda else None, "modules": mods}))
EOF
phase_rc env $?; cat "$ST/env.json"; cat "$ST/machine.txt"; pack

# The learning run's tour and the DAVIS-sized eval set are made on the CPUs while the GPU phases run.
LEARN=$WORK/learn
LS=(--set "data.batch_size=$LEARN_BATCH" --set "optim.lr_batch_reference=$LEARN_BATCH"
    --set "data.synth.seconds=$LEARN_TOUR_S" --set "data.num_workers=$LEARN_WORKERS"
    --set trainer.log_every=10 --set log.picture_every=0 --set log.tensorboard=false "${LEARN_SETS[@]}")
( timeout "$(left 200)" "$PY" - "$LEARN" "${LS[@]}" <<'EOF'
import sys, time
from pathlib import Path
from wtours.stages.video.run import load_pretrain_config, synth_videos
t = time.time()
cfg = load_pretrain_config("video/proof", [a for a in sys.argv[2:] if a != "--set"])
print(synth_videos(cfg, Path(sys.argv[1]), progress=False), "synth seconds", round(time.time() - t, 1))
EOF
) > "$ST/learn_synth.log" 2>&1 &
SYNTH_PID=$!
( timeout "$(left 300)" "$PY" -c "
import sys, time
from pathlib import Path
from wtours.bench.eval import make_davis_sized
s, f = int(sys.argv[1]), int(sys.argv[2])
root = Path(sys.argv[3]) / 'bench-eval' / f'davis_{s}x{f}'
print(make_davis_sized(root, s, f))" "${EVAL_ARGS[1]}" "${EVAL_ARGS[3]}" "$WORK/cache" ) > "$ST/eval_data.log" 2>&1 &
EVALDATA_PID=$!

# ------------------------------------------------------------------------------------------------- cuda tests
say "cuda tests"
timeout "$(left 90 300)" "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests > "$ST/cuda_tests.txt" 2>&1
rc=$?; phase_rc cuda_tests $rc; tail -8 "$ST/cuda_tests.txt"; pack

# ------------------------------------------------------------------------------------------------- bench train
for c in $BT_CONFIGS; do
  n=$(basename "$c")
  say "bench train $c"
  # from $WORK: bench train synthesizes its tour into ./runs/bench
  ( cd "$WORK" && timeout "$(left 80 280)" "${WT[@]}" bench train --config "$c" --steps "$BT_STEPS" "${BT_SETS[@]}" \
      --json "$ST/bench_train_$n.json" ) > "$ST/bench_train_$n.log" 2>&1
  rc=$?; phase_rc "bench_train_$n" $rc; tail -12 "$ST/bench_train_$n.log"; pack
done

# ------------------------------------------------------------------------------------------------- learn
say "learn: calibration step (proof recipe, batch $LEARN_BATCH)"
wait "$SYNTH_PID"; tail -2 "$ST/learn_synth.log"
# bench train synthesizes into runs/bench/data/synth: let that be the learning tour (same data.synth, so reused)
mkdir -p "$WORK/calibration/runs"; ln -sfn "$LEARN" "$WORK/calibration/runs/bench"
( cd "$WORK/calibration" && timeout "$(left 60 240)" "${WT[@]}" bench train --config video/proof "${LS[@]}" --steps "$CALIB_STEPS" \
    --json "$ST/learn_calibration.json" ) > "$ST/learn_calibration.log" 2>&1
phase_rc learn_calibration $?
N=$("$PY" - "$ST/learn_calibration.json" "$TRAIN_S" "$LEARN_BATCH" "$NMIN" "$NMAX" <<'EOF'
import json, sys
path, train_s, batch, nmin, nmax = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
try:
    r = json.load(open(path))
    # 3 processes share the GPU and the CPUs: plan for half the single-process rate, loader included
    rate = min(r["steps_per_s"], r.get("loader_clips_per_s", float("inf")) / batch) / 2
except Exception:  # noqa: BLE001 - no calibration: the smallest run
    rate = 0
print(max(nmin, min(nmax, int(rate * train_s))))
EOF
)
EPOCH_CLIPS=$(( LEARN_BATCH * (N / 10 > 32 ? N / 10 : 32) ))   # warm-up and frozen last layer: 1 epoch = max(32, N/10) steps
echo "learn: $N steps per seed (calibration in learn_calibration.json), epoch $EPOCH_CLIPS clips" | tee "$ST/learn_plan.txt"
LA=(--config video/proof --eval-config eval/proof --out "$LEARN" --max-steps "$N" "${LS[@]}" "${LEARN_EVAL[@]}"
    --set "data.clips_per_epoch=$EPOCH_CLIPS" --set "trainer.checkpoint_every=$(( N / 4 > 1 ? N / 4 : 1 ))")
MON=""
if command -v nvidia-smi > /dev/null && [ "$DRY" = 0 ]; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 5 > "$ST/gpu_util.csv" 2>&1 &
  MON=$!
fi
say "learn: 3 seeds in parallel"
PIDS=""
for s in 0 1 2; do
  OMP_NUM_THREADS=$LEARN_THREADS timeout "$(left $(( TRAIN_S + 150 )) 150)" "${WT[@]}" bench learn "${LA[@]}" \
    --seeds "$s" --time-limit "$TRAIN_S" --quiet --json "$ST/learn_seed$s.json" > "$ST/learn_seed$s.log" 2>&1 &
  PIDS="$PIDS $!"
done
for p in $PIDS; do wait "$p"; echo "learn process $p: exit $?" >> "$ST/learn_plan.txt"; done   # by id: a bare wait waits for tee too
[ -n "$MON" ] && kill "$MON" 2> /dev/null
# the three seeds together: every phase is reused, only the table is computed
timeout "$(left 90 140)" "${WT[@]}" bench learn "${LA[@]}" --seeds 0 1 2 --quiet --json "$ST/learn.json" \
  > "$ST/learn.log" 2>&1
phase_rc learn $?; tail -30 "$ST/learn.log"
for s in 0 1 2; do cp "$LEARN/seed$s/stage1/metrics.csv" "$ST/learn_metrics_seed$s.csv" 2> /dev/null; done
cp "$LEARN/proof.md" "$LEARN/proof.png" "$ST/" 2> /dev/null
pack

# ------------------------------------------------------------------------------------------------- bench neco
if [ -n "$TS_PID" ] && ! kill -0 "$TS_PID" 2> /dev/null && [ -d /tmp/wtours-torchsort/torchsort ]; then
  export PYTHONPATH=$PYTHONPATH:/tmp/wtours-torchsort; NECO_ARGS+=(torchsort)
fi
say "bench neco ${NECO_ARGS[*]}"
timeout "$(left 70 130)" "${WT[@]}" bench neco "${NECO_ARGS[@]}" --json "$ST/bench_neco.json" > "$ST/bench_neco.log" 2>&1
phase_rc bench_neco $?; tail -8 "$ST/bench_neco.log"; pack

# ------------------------------------------------------------------------------------------------- bench eval
say "bench eval ${EVAL_ARGS[*]}"
wait "$EVALDATA_PID"; tail -1 "$ST/eval_data.log"
timeout "$(left 90 60)" "${WT[@]}" bench eval "${EVAL_ARGS[@]}" --json "$ST/bench_eval.json" > "$ST/bench_eval.log" 2>&1
phase_rc bench_eval $?; tail -8 "$ST/bench_eval.log"; pack

# ------------------------------------------------------------------------------------------------- suite
say "test suite with CUDA present"
IGN=(); "$PY" -c "import ot" 2> /dev/null || IGN=(--ignore=tests/test_sinkhorn.py)
timeout "$(left 300 15)" "$PY" -m pytest -q -p no:cacheprovider "${IGN[@]}" "${SUITE_ARGS[@]}" > "$ST/suite.txt" 2>&1
phase_rc suite $?; tail -15 "$ST/suite.txt"
[ -n "$TS_PID" ] && kill "$TS_PID" 2> /dev/null

# ------------------------------------------------------------------------------------------------- summary
"$PY" scripts/gpu_check_summary.py "$ST" --dry "$DRY" > "$OUT/summary.md" 2> "$ST/summary.err" || echo "summary failed"
cp "$OUT/summary.md" "$ST/summary.md" 2> /dev/null
pack
say "done: $OUT/summary.md, $OUT/gpu_check.tgz"
cat "$OUT/summary.md"
