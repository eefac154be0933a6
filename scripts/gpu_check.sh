#!/usr/bin/env bash
# Every GPU measurement docs/benchmarks.md asks for, in one command on a CUDA machine.
#
#   scripts/gpu_check.sh --fetch     # on a machine with internet: wheels of the pure-Python packages
#                                    # an offline GPU image may lack (Hydra, OmegaConf) into .whl/
#   OUT=/path/to/results scripts/gpu_check.sh   # on the GPU machine; ~5 min on an H100
#
# The GPU machine needs python3 with a CUDA build of torch, lightning, torchmetrics, scikit-image,
# rich and safetensors. Whatever .whl/ holds is installed into /tmp/site first (no network needed).
# Results: $OUT/gla_cuda.txt (benchmark_gla.py --device cuda), $OUT/precision.{json,txt}
# (benchmark_precision.py: float32 vs bf16-mixed throughput, peak memory, PSNR after a short run).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch" ]]; then
    mkdir -p .whl
    # antlr4-python3-runtime 4.9.3 (what OmegaConf 2.3 needs) is published as a source archive only:
    # build its (pure-Python) wheel here.
    python3 -m pip wheel --no-deps -q -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
    ls .whl
    exit 0
fi

OUT="${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu.txt"

python3 scripts/benchmark_gla.py --device cuda --repeats 10 --train-batches 2 16 --breakdown 2>&1 | tee "$OUT/gla_cuda.txt"
python3 scripts/benchmark_precision.py --device cuda --json "$OUT/precision.json" --run-dir /tmp/precision_runs \
    2>&1 | tee "$OUT/precision.txt"
