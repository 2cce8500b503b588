#!/usr/bin/env bash
# GPU campaign: everything a session lent the GPU machine (one H200, 16 cores) measures in ONE device call
# of at most 9 minutes. Every result is JSON under $OUT (default ./gpu_campaign_out), at most 8 files:
#
#   env.json             nvidia-smi, python / torch / CUDA / cuDNN versions, which optional modules import
#   status.json          per step: ok | failed | timeout | skipped, exit status, seconds, budget (rewritten
#                        after every step, so a killed campaign still says how far it got)
#   learning_h200.json   Megapixel MNIST at the paper's scale (1500^2, 900 patches of 50^2, M = I = 100,
#                        batch 16), IPS (configs/mnist.yaml) in bf16 for a fixed time: test accuracy about
#                        once a minute (metrics.csv rows), test_metrics.json, the step-time probe and the plan
#   memory_h200.json     peak GPU memory of one training step, 1 to 1000 megapixels, IPS and DPS-candidates
#   train_step_h200.json benchmarks/train_step.py: IPS step at batch 16, N = 900 / 3600 / 250k, fp32 vs bf16
#   topk_op_h200.json    benchmarks/topk_op.py on CUDA (traffic and billiard sizes)
#   speed_study_h200.json  benchmarks/speed_study.py on CUDA, reduced grid
#   campaign.log         every command's output
#
#     bash benchmarks/gpu_campaign.sh             # on the GPU machine (see benchmarks/README.md, "GPU campaign")
#     bash benchmarks/gpu_campaign.sh --dry-run   # here, on the CPU: tiny sizes, same steps, same files
#
# Inputs carried to the machine (git-ignored folders):
#   .whl/    wheels the machine lacks (zarr, numcodecs, h5py, torchmetrics, ...): bash benchmarks/gpu_wheels.sh
#   .mnist/  MNIST IDX files (the machine has none and no network): copy the IDX files you have into .mnist/,
#            or name a carried folder with $HRSEL_MNIST_DIR. With only the t10k pair (as on the dev machine)
#            the generator does what hrsel does everywhere (hrsel/data/digits.py): it splits the 10000 t10k
#            digits into disjoint pools of 8000 train and 2000 test digits and says so in learning_h200.json.
#   The dry run needs neither: it writes tiny IDX files itself when $HRSEL_MNIST_DIR is unset.
# Environment: OUT (results folder), PYTHON (default python3), CAMPAIGN_SECONDS (whole budget, default 530).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_campaign.sh [--dry-run]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
OUT=${OUT:-./gpu_campaign_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_campaign.XXXXXX")
LOG=$OUT/campaign.log
: >"$LOG"
START=$(date +%s)
TOTAL=${CAMPAIGN_SECONDS:-530}
STATUS=$WORK/status.tsv
: >"$STATUS"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [ $DRY = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi

log() { echo "[campaign +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# seconds a step may use: its own budget, capped by what is left of the whole
budget() {
  local left=$(( TOTAL - ($(date +%s) - START) ))
  if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

write_status() {
  "$PY" - "$STATUS" "$OUT/status.json" "$DRY" "$TOTAL" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
steps = {name: {"status": status, "rc": int(rc), "seconds": int(sec), "budget_s": int(budget), "note": note}
         for name, status, rc, sec, budget, note in rows}
json.dump({"dry_run": sys.argv[3] == "1", "campaign_budget_s": int(sys.argv[4]), "elapsed_s": int(sys.argv[5]),
           "steps": steps}, open(sys.argv[2], "w"), indent=1)
EOF
}

record() {  # NAME STATUS RC SECONDS BUDGET NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6:-}" >>"$STATUS"
  write_status
  log "step $1: $2 (rc $3, $4 s of $5 s) ${6:-}"
}

# run_step NAME BUDGET COMMAND...: the command under `timeout`, output in campaign.log; never stops the campaign
run_step() {
  local name=$1 want=$2; shift 2
  local b; b=$(budget "$want")
  if [ "$b" -lt 5 ]; then record "$name" skipped 0 0 "$want" "campaign time used up"; return 1; fi
  log "step $name (budget $b s): $*"
  local t0=$(date +%s) rc=0
  if declare -F "$1" >/dev/null; then  # a function of this script: it enforces its budget itself
    ( "$@" ) >>"$LOG" 2>&1 || rc=$?
  else
    timeout -k 5 "$b" "$@" >>"$LOG" 2>&1 || rc=$?
  fi
  local sec=$(( $(date +%s) - t0 ))
  if [ $rc = 0 ]; then record "$name" ok 0 "$sec" "$b"
  elif [ $rc = 124 ] || [ $rc = 137 ]; then record "$name" timeout "$rc" "$sec" "$b" "stopped by its time budget"
  else record "$name" failed "$rc" "$sec" "$b" "see campaign.log"; fi
  return $rc
}

# ----------------------------------------------------------------------------- 0. setup
setup() {
  if [ $DRY = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
    timeout 25 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      .whl/*.whl || return 1
  fi
  "$PY" - "$OUT/env.json" "$DRY" <<'EOF'
import importlib, json, os, platform, shutil, subprocess, sys
env = {"dry_run": sys.argv[2] == "1", "python": sys.version, "platform": platform.platform(),
       "cpu_count": os.cpu_count(), "pythonpath": os.environ.get("PYTHONPATH", "")}
if shutil.which("nvidia-smi"):
    env["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
    env["nvidia_smi_query"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit", "--format=csv"],
        capture_output=True, text=True).stdout
modules = {}
for name in ("torch", "numpy", "numba", "zarr", "numcodecs", "h5py", "imagecodecs", "tifffile", "timm",
             "torchmetrics", "einops", "yaml", "tqdm", "matplotlib", "PIL", "openslide", "hrsel"):
    try:
        module = importlib.import_module(name)
        modules[name] = getattr(module, "__version__", "present")
    except Exception as exc:  # report, never stop: the steps say what they miss
        modules[name] = f"MISSING ({type(exc).__name__}: {exc})"
env["modules"] = modules
try:
    import torch
    env["torch_cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                      "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
                      "bf16": torch.cuda.is_bf16_supported()}
except Exception as exc:
    env["torch_error"] = repr(exc)
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env["modules"]))
EOF
}
if [ $DRY = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then export PYTHONPATH=$WORK/site:$PYTHONPATH; fi
run_step setup 30 setup

# ----------------------------------------------------------------------------- 1. Megapixel MNIST learning curve
DATA=$WORK/megapixel_mnist
RUNS=$WORK/runs
if [ $DRY = 1 ]; then
  SIDE=200; N_TRAIN=32; N_TEST=16; BATCH=4; WORKERS=2; PROBE_STEPS=1; LIMIT_EVAL=4
  SIZE=(data.batch_size=$BATCH data.eval_batch_size=$BATCH data.num_workers=0 model.k=4
        model.score_chunk=8 model.num_positions=16)
else
  SIDE=1500; N_TRAIN=5000; N_TEST=1000; BATCH=16; WORKERS=16; PROBE_STEPS=40; LIMIT_EVAL=500
  SIZE=(data.num_workers=12)
fi
if [ -n "${HRSEL_MNIST_DIR:-}" ]; then MNIST=$HRSEL_MNIST_DIR
elif [ $DRY = 0 ] && [ -d .mnist ]; then MNIST=$REPO/.mnist
elif [ $DRY = 1 ]; then
  MNIST=$WORK/mnist
  "$PY" - "$MNIST" <<'EOF'
# tiny stand-in IDX files (t10k pair only: the generator splits them into train/test pools as hrsel does)
import gzip, sys
from pathlib import Path
import numpy as np
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
labels = (np.arange(200) % 10).astype(np.uint8)
images = np.zeros((200, 28, 28), np.uint8)
for i, label in enumerate(labels):
    images[i, 6:22, 8 + 2 * (label % 5):12 + 2 * (label % 5)] = 255
for name, array in (("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(folder / name, "wb") as f:
        f.write(header + array.tobytes())
EOF
else MNIST=""; log "no MNIST: set HRSEL_MNIST_DIR or carry .mnist/ (see benchmarks/README.md)"; fi

run_step data 80 env ${MNIST:+HRSEL_MNIST_DIR=$MNIST} "$PY" tools/make_megapixel_mnist.py \
  --width $SIDE --height $SIDE --n-train $N_TRAIN --n-test $N_TEST --workers $WORKERS --no-download --quiet \
  ${MNIST:+--mnist-dir "$MNIST"} "$DATA"

COMMON=(configs/mnist.yaml "data.root=$DATA" data.generate_if_missing=false data.val_split=none
        train.precision=bf16 train.progress_bar=false eval.pictures=0 optim.warmup_epochs=0
        optim.warmup_ratio=0.05 "${SIZE[@]}" --output-dir "$RUNS" --device $DEVICE)
TRAIN_END=$(( $(date +%s) + $(budget 200) ))  # probe + training share one budget
PROBE_T0=$(date +%s)
run_step probe 75 "$PY" -m hrsel.train "${COMMON[@]}" experiment=probe train.epochs=1 \
  train.max_steps=$PROBE_STEPS data.limit_train=$(( PROBE_STEPS * BATCH )) data.limit_eval=$BATCH
PROBE_WALL=$(( $(date +%s) - PROBE_T0 ))

# the plan: steps from the probe's measured step time, one evaluation (of LIMIT_EVAL test images) a minute
plan() {
  "$PY" - "$RUNS/probe" "$PROBE_WALL" "$(( TRAIN_END - $(date +%s) ))" "$N_TRAIN" "$BATCH" "$PROBE_STEPS" \
    "$LIMIT_EVAL" "$DRY" "$WORK/plan.json" <<'EOF'
import csv, json, math, sys
run, wall, left, n_train, batch, probe_steps, limit_eval, dry, out = sys.argv[1:]
wall, left, n_train, batch, probe_steps, limit_eval = map(int, (wall, left, n_train, batch, probe_steps, limit_eval))
row = list(csv.DictReader(open(f"{run}/metrics.csv")))[-1]
step_s = float(row["ms_per_batch"]) / 1000  # includes the warm-up steps: errs towards fewer steps
# the probe's evaluation of one batch: mostly fixed costs (checkpoint, loader start); each further eval
# batch costs at most half a training step (forward only)
probe_eval = max(0.0, float(row["epoch_s"]) - probe_steps * step_s)
startup = max(0.0, wall - float(row["epoch_s"]) - probe_eval)  # imports, model, final test, writing
eval_s = probe_eval + limit_eval / batch * step_s / 2
avail = left - startup - 10.0
steps_per_min = max(1, round(60 / step_s))
full_epoch = n_train // batch
if full_epoch >= steps_per_min:
    steps_per_epoch, eval_every, limit_train = steps_per_min, 1, steps_per_min * batch
else:
    steps_per_epoch, eval_every, limit_train = full_epoch, max(1, round(steps_per_min / full_epoch)), 0
evals = math.ceil(avail / 60) + 1  # one a minute, and the final test with best.pt
steps = max(1, math.floor((avail - evals * eval_s) / step_s))
if dry == "1":
    steps, steps_per_epoch, eval_every, limit_train = 2, 2, 1, 2 * batch
epochs = max(1, math.ceil(steps / steps_per_epoch))
plan = dict(step_s=step_s, eval_s=eval_s, probe_eval_s=probe_eval, startup_s=startup, seconds_left=left, steps=steps, epochs=epochs,
            steps_per_epoch=steps_per_epoch, eval_every=eval_every, limit_train=limit_train,
            limit_eval=limit_eval, probe_row=row, probe_wall_s=wall)
json.dump(plan, open(out, "w"), indent=1)
print(f"MAX_STEPS={steps} EPOCHS={epochs} EVAL_EVERY={eval_every} LIMIT_TRAIN={limit_train}")
EOF
}
PLAN=$(plan 2>>"$LOG") || PLAN=""
log "plan: ${PLAN:-none (the probe failed; a fixed guess of 1000 steps follows)}"
MAX_STEPS=1000 EPOCHS=4 EVAL_EVERY=1 LIMIT_TRAIN=0
[ $DRY = 1 ] && MAX_STEPS=2 EPOCHS=1 LIMIT_TRAIN=$(( 2 * BATCH ))
[ -n "$PLAN" ] && eval "$PLAN"
[ -z "$PLAN" ] && [ $DRY = 0 ] && LIMIT_TRAIN=$(( 250 * BATCH ))
TRAIN_LEFT=$(( TRAIN_END - $(date +%s) ))
run_step train $(( TRAIN_LEFT > 5 ? TRAIN_LEFT : 5 )) "$PY" -m hrsel.train "${COMMON[@]}" experiment=learning \
  train.max_steps=$MAX_STEPS train.epochs=$EPOCHS train.eval_every=$EVAL_EVERY data.limit_train=$LIMIT_TRAIN \
  data.limit_eval=$LIMIT_EVAL

"$PY" - "$RUNS/learning" "$WORK/plan.json" "$DATA" "$OUT/learning_h200.json" "$MNIST" <<'EOF' >>"$LOG" 2>&1
import csv, json, os, sys
run, plan, data, out, mnist = sys.argv[1:]

def number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v

result = {"benchmark": "megapixel_mnist_learning", "config": "configs/mnist.yaml", "precision": "bf16",
          "selection": "data.val_split=none: the test subset (data.limit_eval) is scored each evaluation",
          "mnist_dir": mnist or None}
for key, path in (("plan", plan), ("test_metrics", f"{run}/test_metrics.json")):
    result[key] = json.load(open(path)) if os.path.exists(path) else None
for name in os.listdir(data) if os.path.isdir(data) else []:  # the generator's parameters (digit source)
    if name.endswith(".json") and "label" not in name:
        result.setdefault("data_parameters", {})[name] = json.load(open(os.path.join(data, name)))
rows, elapsed = [], 0.0
if os.path.exists(f"{run}/metrics.csv"):
    for row in csv.DictReader(open(f"{run}/metrics.csv")):
        row = {k: number(v) for k, v in row.items() if v != ""}
        elapsed += row.get("epoch_s", 0.0)
        rows.append(dict(row, elapsed_s=round(elapsed, 1)))
result["epochs"] = rows
result["test_accuracy_curve"] = [(r["elapsed_s"], r["step"], r.get("test/majority/accuracy")) for r in rows]
json.dump(result, open(out, "w"), indent=1)
print(f"wrote {out}: {len(rows)} epoch rows")
EOF

# ----------------------------------------------------------------------------- 2. peak memory, 1 to 1000 MP
memory() {
  local sides=$1; shift
  for side in ${sides//,/ }; do
    local left=$(( MEM_END - $(date +%s) ))
    if [ $left -lt 10 ]; then echo "memory: no time left for side $side" >>"$WORK/mem_skipped"; continue; fi
    timeout -k 5 $left "$PY" benchmarks/memory.py --methods ips,dps_candidates --sides "$side" --device $DEVICE \
      --timeout $(( left / 2 > 10 ? left / 2 : 10 )) --json "$WORK/mem_$side.json" "$@" || echo "side $side rc $?"
  done
  "$PY" - "$WORK" "$OUT/memory_h200.json" "$sides" <<'EOF'
import glob, json, os, sys
work, out, sides = sys.argv[1:]
rows, meta = [], {}
for side in sides.split(","):
    path = os.path.join(work, f"mem_{side}.json")
    if os.path.exists(path):
        part = json.load(open(path))
        rows += part.pop("rows")
        meta.update(part)
    else:
        rows.append({"side": int(side), "pixels": int(side) ** 2, "status": "not run (time budget, or memory.py crashed: see campaign.log)"})
json.dump(dict(meta, benchmark="memory", sides=[int(s) for s in sides.split(",")], rows=rows),
          open(out, "w"), indent=1)
print(f"wrote {out}: {len(rows)} rows")
EOF
}
# the dry run avoids --quick: its 64-pixel patches are too small for dps_candidates' scorer (8 < 9 pixels)
if [ $DRY = 1 ]; then MEM_SIDES=1000; MEM_ARGS=(--threads 1); else MEM_SIDES=1000,3163,10000,31623; MEM_ARGS=(); fi
MEM_END=$(( $(date +%s) + $(budget 70) ))
run_step memory 75 memory "$MEM_SIDES" "${MEM_ARGS[@]}"

# ----------------------------------------------------------------------------- 2b. IPS training step, fp32 vs bf16
# benchmarks/train_step.py: ms per step and peak memory at batch 16, N = 900 / 3600 / 250,000 (lazy synthetic
# images, hrsel only: the plain implementation reads them patch by patch); one process per row, JSON rewritten
# after each, so the rows measured before the budget runs out are kept
if [ $DRY = 1 ]; then
  TSTEP=(--quick --device cpu --threads 1 --cases ips_b16_n900 --rounds 1 --repeats 1 --timeout 60)
else
  TSTEP=(--device cuda --precision fp32,bf16 --cases ips_b16_n900,ips_b16_n3600,ips_b16_n250000 --rounds 1
         --repeats 2 --skip-plain-above 10000 --timeout 45)
fi
run_step train_step 75 "$PY" benchmarks/train_step.py "${TSTEP[@]}" --json "$OUT/train_step_h200.json"

# ----------------------------------------------------------------------------- 3. top-K operator, speed study
if [ $DRY = 1 ]; then
  TOPK=(--cases tiny --devices cpu --repeats 1)
  SPEED=(--quick --device cpu --threads 1 --image-size 96 --downscale 2 --num-samples 20 --warmup 0)
else
  TOPK=(--cases traffic billiard --devices cuda --repeats 5)
  SPEED=(--device cuda --image-size 1000 --ks 5 10 --patch-sizes 50 --max-batch 32 --warmup 2 --iters 5
         --min-seconds 0.25)
fi
run_step topk_op 25 "$PY" benchmarks/topk_op.py "${TOPK[@]}" --json "$OUT/topk_op_h200.json"
run_step speed_study 45 "$PY" benchmarks/speed_study.py "${SPEED[@]}" --json "$OUT/speed_study_h200.json" \
  --plot "$WORK/speed_study_h200.png"

log "done in $(( $(date +%s) - START )) s; results in $OUT"
write_status
rm -rf "$WORK"
exit 0
