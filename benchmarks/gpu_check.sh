#!/usr/bin/env bash
# The GPU check: every figure a few minutes of a GPU should give, in one run, from a fresh copy
# of the tree (the device machine reaches no registry: it uses the torch it has, no faiss needed).
#
#   benchmarks/gpu_check.sh          on the GPU (about 6 minutes on one H200)
#   benchmarks/gpu_check.sh --cpu    tiny sizes on the CPU: CI runs it (tests/test_benchmarks.py),
#                                    so the script cannot rot while no GPU is at hand
#
# Each step writes JSON (or the test report) to $OUT when the device tool sets it, else to
# benchmarks/results/gpu-check-DATE/; env.json names the device, versions and date.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from a bare checkout, installed or not
PY=${PYTHON:-python3}
DEVICE=cuda
if [ "${1:-}" = "--cpu" ]; then DEVICE=cpu; fi
DEST=${OUT:-benchmarks/results/gpu-check-$(date +%F)}
mkdir -p "$DEST"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
step() { echo "== $* ($(date +%T))" >&2; }

# Wheels carried in (the device machine has torch but no faiss): wheels/*.whl, installed offline.
if ! $PY -c "import faiss" 2>/dev/null && compgen -G "wheels/*.whl" >/dev/null; then
    step "installing the carried wheels"
    $PY -m pip install -q --no-index --no-deps wheels/*.whl
fi

step "environment"
$PY - "$DEST/env.json" "$DEVICE" <<'PYTHON'
import datetime, json, sys
import torch
from instret.env import environment  # `instret env`; the command line needs an install (instret.cli)
path, device = sys.argv[1], sys.argv[2]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no GPU (use --cpu for the CPU run)")
env = environment()
env.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", date=datetime.date.today().isoformat())
json.dump(env, open(path, "w"), indent=2)
PYTHON

step "the device tests (tests/test_device.py) on $DEVICE"
# -o addopts=: one process (pyproject asks for a worker per core; the device machine may lack xdist).
INSTRET_TEST_DEVICE=$DEVICE $PY -m pytest -p no:cacheprovider -o addopts=-q -m device tests/test_device.py \
    > "$DEST/device-tests.txt" 2>&1 || { cat "$DEST/device-tests.txt" >&2; exit 1; }
tail -1 "$DEST/device-tests.txt" >&2

step "training: ResNet-18 on CIFAR-10 (gpu_cifar10.py)"
if [ "$DEVICE" = cpu ]; then
    $PY - "$TMP/c.npz" <<'PYTHON'
import sys, numpy as np
r = np.random.default_rng(0)
np.savez(sys.argv[1], train_x=r.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8), train_y=r.integers(0, 10, 300),
         test_x=r.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8), test_y=r.integers(0, 10, 50))
PYTHON
    TRAIN=(--npz "$TMP/c.npz" --arch small --device cpu --max-steps 2)
else
    # The device machine has no ../shared: a carried CIFAR-10 JPEG folder (data/cifar10) or an npz.
    DATA=${CIFAR10:-data/cifar10}
    if [ -f "$DATA" ]; then TRAIN=(--npz "$DATA"); else TRAIN=(--data "$DATA"); fi
    TRAIN+=(--device cuda --minutes 3)
fi
$PY benchmarks/gpu_cifar10.py "${TRAIN[@]}" --out "$TMP/run" | tail -1 > "$DEST/gpu_cifar10.json"
cat "$DEST/gpu_cifar10.json" >&2

step "the kNN monitor's search on $DEVICE against FAISS on the CPU"
if [ "$DEVICE" = cpu ]; then SIZE=(--bank 2000 --queries 300); else SIZE=(--bank 50000 --queries 10000); fi
$PY benchmarks/knn_monitor.py --device "$DEVICE" --epoch-steps 0 "${SIZE[@]}" | tail -1 > "$DEST/knn_monitor.json"
cat "$DEST/knn_monitor.json" >&2

step "index and query with the encoder on $DEVICE"
$PY - "$TMP" "$DEVICE" > "$DEST/index_query.json" <<'PYTHON'
import json, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
from instret.encoder import Encoder, save_encoder
from instret.indexer import build_index
from instret.index import SearchIndex
from instret.searcher import Searcher
tmp, device = Path(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
photos = tmp / "photos"
photos.mkdir()
for i in range(200 if device == "cpu" else 2000):
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(photos / f"{i:05d}.jpg")
save_encoder(Encoder("small", 128, 32).eval(), tmp / "encoder.pt", (0.5,) * 3, (0.25,) * 3)
seconds = {}
for where in ("cpu", device):
    start = time.perf_counter()
    build_index(photos, tmp / "encoder.pt", tmp / f"ix-{where}", workers=2, device=where)
    seconds[where] = round(time.perf_counter() - start, 2)
a, b = (np.asarray(SearchIndex(tmp / f"ix-{w}").vectors()[0]) for w in ("cpu", device))
hits = Searcher(tmp / f"ix-{device}", device=device).query([photos / "00007.jpg"], k=1)[0]["results"]
print(json.dumps({"images": len(a), "index_seconds": seconds, "max_cosine_gap": float(1 - (a * b).sum(1).min()),
                  "query_finds_itself": hits[0]["path"].endswith("00007.jpg")}))
PYTHON
cat "$DEST/index_query.json" >&2
step "done: figures in $DEST"
