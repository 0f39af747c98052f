#!/usr/bin/env bash
# Device check for the CLI on a GPU machine (issue 14, item 6): `--device auto` picks CUDA, the
# summary names the GPU, torchrun ranks take their local device, and the fault tests pass there.
# Run from the repository root: bash scripts/gpu_check.sh
set -u
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())" || exit 1
$PY -c "import matplotlib, tqdm" 2>/dev/null || { echo "matplotlib/tqdm missing: pip install matplotlib tqdm"; exit 1; }
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
SMOKE="data_size=60 batch_time=5 batch_size=5 epochs=2 eval_every=11 checkpoint_every=4 snapshots=2"
rm -rf "$OUT/auto" "$OUT/ddp"
$PY -m neuralode run spiral --set $SMOKE --out "$OUT/auto" --no-progress
$PY -c "import json,sys; s=json.load(open('$OUT/auto/summary.json')); print('auto ->', s['device']); sys.exit(0 if s['device'].startswith('cuda') else 1)" || echo "FAIL: auto did not pick CUDA"
if $PY -c "import torch.distributed.run" 2>/dev/null; then
  $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m neuralode run spiral --set $SMOKE --out "$OUT/ddp" --no-progress
  $PY -c "import json; print('torchrun ->', json.load(open('$OUT/ddp/summary.json'))['device'])"
fi
$PY -m pytest -q -p no:cacheprovider -p no:xdist tests/test_cli_faults.py tests/test_runner.py tests/test_runner_kill.py -q 2>&1 | tail -15
