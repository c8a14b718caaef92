#!/usr/bin/env bash
# The GPU check: SubFit on cuda in bf16, end to end, in one short script (about 10 minutes on one
# GPU). With --cpu every step runs on the CPU at a smaller size, so the script itself is tested
# where there is no GPU. Prints what it measures and writes $OUT/gpu_check.json (OUT defaults to
# runs/gpu_check).
#
#   bash benchmarks/gpu_check.sh            # on a machine with a GPU
#   bash benchmarks/gpu_check.sh --cpu      # the same steps on the CPU, smaller
#
# Steps:
#   1. the default run (SubFit on the embedded SmolLM2-135M) on the device in bf16
#   2. a comparison of three strategies on the device (one dense pass shared), the low-rank stage among them
#   3. the streamed 8B-shaped model (benchmarks/memory.py): 32 layers on a GPU, 4 on the CPU
#   4. the same small run on the CPU and on the device: the same selection (on a GPU with fast float64,
#      fit_device=auto fits on the device there)
#   5. with two GPUs or more: the 8B-shaped model, 8 layers, with its weights spread over the GPUs
#      (offload=gpus) against held on one (offload=none): the same selection (skipped otherwise)
#   6. one candidate's fit at d = 4096 (benchmarks/fit_cost.py) on the device against the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
OUT=${OUT:-runs/gpu_check}
DEVICE=cuda
LAYERS=32
DIVISOR=1       # the 8B shapes' width is divided by this (1: the real shapes)
SAMPLES=64
FIT_DIM=4096
if [[ "${1:-}" == "--cpu" ]]; then
    DEVICE=cpu
    LAYERS=4
    DIVISOR=8
    SAMPLES=4
    FIT_DIM=512
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false SUBFIT_PROGRESS=0
mkdir -p "$OUT"
SMALL="calib.samples=$SAMPLES calib.seq_len=128 scoring.samples=4 eval.windows=8 eval.domains=[] calib.generated=0"
step() { echo "== $1"; date +%s > "$OUT/.t0"; }
took() { echo $(( $(date +%s) - $(cat "$OUT/.t0") )); }

step "1. default run on $DEVICE (bf16)"
"$BIN/subfit-run" strategy=subfit device=$DEVICE dtype=bfloat16 $SMALL output_dir="$OUT/run" overwrite=true > "$OUT/run.log"
RUN_S=$(took)

step "2. compare on $DEVICE"
"$BIN/subfit-compare" strategies=[subfit,shortgpt,aa-svd] sparsities=[0.25] device=$DEVICE dtype=bfloat16 $SMALL \
    output_dir="$OUT/compare" overwrite=true > "$OUT/compare.log"
COMPARE_S=$(took)

step "3. streamed 8B-shaped model, $LAYERS layers (width / $DIVISOR)"
$PY benchmarks/memory.py --layers $LAYERS --modes disk --width-divisor $DIVISOR --work "$OUT/memory-work" \
    --out "$OUT/memory" device=$DEVICE > "$OUT/memory.log"
MEMORY_S=$(took)

step "4. the same selection on cpu and on $DEVICE"
for d in cpu $DEVICE; do
    "$BIN/subfit-run" strategy=subfit device=$d dtype=float32 $SMALL cache_stats=false save=false \
        output_dir="$OUT/same-$d" > "$OUT/same-$d.log"
done
SAME_S=$(took)

GPUS=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
rm -f "$OUT/gpus.json"
if [[ $DEVICE == cuda && $GPUS -ge 2 ]]; then
    step "5. weights spread over $GPUS GPUs (offload=gpus) against held on one"
    $PY benchmarks/memory.py --layers 8 --modes none gpus --width-divisor $DIVISOR --work "$OUT/memory-work" \
        --out "$OUT/gpus" device=$DEVICE > "$OUT/gpus.log"
    GPUS_S=$(took)
else
    echo "== 5. offload=gpus: skipped ($GPUS GPU(s) here; it needs two)"
    GPUS_S=0
fi

step "6. one fit at d = $FIT_DIM on cpu and on $DEVICE"
for d in cpu $DEVICE; do
    $PY benchmarks/fit_cost.py --dims $FIT_DIM --device $d --out "$OUT/fit-$d.json" > "$OUT/fit-$d.log"
done
FIT_S=$(took)

$PY - "$OUT" "$DEVICE" "$RUN_S" "$COMPARE_S" "$MEMORY_S" "$SAME_S" "$GPUS_S" "$FIT_S" <<'EOF'
import json, sys
from pathlib import Path
out, device, *seconds = sys.argv[1:]
out = Path(out)

def replaced(log):  # the "replaced" row of a run's summary table
    return next(l.split("|")[2].strip() for l in (out / log).read_text().splitlines() if l.startswith("| replaced"))

memory = json.loads((out / "memory.json").read_text())
result = {"device": device,
          "seconds": dict(zip(["run", "compare", "streamed", "same_selection", "gpus", "fits"], map(int, seconds))),
          "run_ppl": json.loads((out / "run" / "results.json").read_text())["perplexity"],
          "streamed": memory["rows"], "selection_cpu": replaced("same-cpu.log"),
          "selection_device": replaced(f"same-{device}.log"),
          "fit": {d: json.loads((out / f"fit-{d}.json").read_text())["rows"][0] for d in {"cpu", device}}}
result["same_selection"] = result["selection_cpu"] == result["selection_device"]
if (out / "gpus.json").is_file():  # step 5 ran: one selection whether the weights lie on one GPU or several
    spread = json.loads((out / "gpus.json").read_text())["rows"]
    result["gpus"] = spread
    result["same_selection"] &= len({str(row["replaced"]) for row in spread}) == 1
(out / "gpu_check.json").write_text(json.dumps(result, indent=2))
print(json.dumps({k: result[k] for k in ("device", "seconds", "same_selection")}, indent=2))
for row in memory["rows"]:
    device_gb = f", peak device memory {row['peak_device_gb']:.2f} GB" if row.get("peak_device_gb") is not None else ""
    print(f"streamed {row['layers']} layers: peak RSS {row['peak_rss_gb']:.2f} GB ({row['rss_over_weights']:.2f}x weights)"
          f"{device_gb}, {row['wall_s']:.0f} s")
for d, row in result["fit"].items():
    print(f"one fit at d = {row['d']} on {d}: ridge solve {row['ridge_solve_s']:.2f} s, low-rank fit {row['fit_randomized_s']:.2f} s")
sys.exit(0 if result["same_selection"] else 1)
EOF
