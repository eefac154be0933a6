#!/usr/bin/env bash
# Every GPU measurement docs/benchmarks.md asks for, in one offline command on a CUDA machine.
#
#   scripts/gpu_check.sh --fetch     # on a machine with internet: wheels of the pure-Python packages
#                                    # an offline GPU image may lack (Hydra, OmegaConf) into .whl/, and
#                                    # the authors' code (laoyangui/DLSN; or DLSN_MIRROR=<a clone>) into
#                                    # .published/DLSN (git-ignored: carry it, never commit it)
#   OUT=/path/to/results scripts/gpu_check.sh   # on the GPU machine: every target, in at most 6 minutes
#                                    # on an H100/H200 (the target; summary.md's last row says how long)
#   OUT=/path/to/results scripts/gpu_check.sh --information   # then also the information steps (about
#                                    # a minute more): profiles and bf16 rows that explain the targets
#   OUT=/tmp/rehearsal scripts/gpu_check.sh --rehearse [--information]   # the same steps on the CPU at toy
#                                    # sizes (minutes): every command line still matches its script and
#                                    # every output reaches summary.md; measures nothing (tests/test_gpu_check.py)
#
# The GPU machine needs python3 with a CUDA build of torch (with its triton), lightning, torchmetrics,
# scikit-image, rich and safetensors. Whatever .whl/ holds is installed into /tmp/site first (no
# network needed). Every step writes its raw output to a file under $OUT (nothing is piped, so a run
# cut short keeps what it printed) and the script goes on after a failing step:
#   gpu.txt             GPU, driver, torch/triton/lightning versions
#   warm.txt            scripts/warm_kernel_cache.py: the fused kernels compiled into Triton's cache, in
#                       parallel processes (each later step would otherwise compile them one at a time)
# then, at the same time (none of them times anything it reports as a target, so they may share the GPU):
#   compile_bf16.{txt,json}, compile_32.{txt,json}   scripts/benchmark_train_step.py, the compiled paper
#                       training step alone, one process per precision: the compile warm-up from an empty
#                       torch.compile cache (the target; an upper bound, measured beside the other steps;
#                       the fused GLA kernels come compiled from the warm step, as on a user's second run),
#                       and the compiled graphs left in Inductor's on-disk cache for train_step
#   precision.{txt,json}    scripts/benchmark_precision.py: validation PSNR after a short train.py run (rate
#                       decaying to 0) in float32 and bf16-mixed, and float32 repeated with the same seed (the
#                       measurement's noise); the three runs at once, cuDNN's autotuner and GLA's timed
#                       choices off in them
#   check.{txt,json}    scripts/check_fused_gla.py: the fused kernel against the reference (float32,
#                       bf16), true-float32 match embedding, sync-free rotations, CUDA graph, compile
# then, alone on the GPU:
#   train_step.{txt,json}   scripts/benchmark_train_step.py: the paper training step (x2, batch 16,
#                       48x48) of this project, eager and compiled (the compiled graphs from the cache),
#                       against the published code (when .published/DLSN/src is there), float32 and
#                       bf16-mixed; steps in order of importance, so a run cut short keeps the headline
#   gla_targets.{txt,json}  scripts/benchmark_gla.py --targets: issue 9's model-level rows for the
#                       authors' code (with .published), the published layout, the reference and the
#                       fused implementation, float32 with TF32 matrix products on all of them, each
#                       case with its ten largest GPU kernels
#   duration.json       seconds from the start to the last target's end (issue 9: at most 6 minutes)
# and with --information the information steps:
#   gla_batch1_profile.txt   scripts/profile_train_step.py --sections gla_batch1 backward_modes: where the
#                       batch-1 GLA rows spend host and device time, this project against the published
#                       layout; the fused backward's time as each variant the timed choice tries
#   weight_grad.{txt,json}   scripts/benchmark_weight_grad.py: the weight gradients of the paper's 3x3
#                       convolutions in float32 (TF32), cuDNN against im2col + cuBLAS and a Triton kernel
#   gla_targets_bf16.{txt,json}   the model-level rows under bf16 autocast
#   gla_compiled.{txt,json}   the GLA forward+backward rows with this project's GLA under torch.compile as
#                       train.py's compiled training steps run it (the eager rows above are the targets)
#   train_step_heuristics.{txt,json}   the eager training step of this project with cuDNN's heuristics
#                       instead of its autotuner (what dlsn.callbacks.CudnnAutotune gains)
#   summary.md          the markdown table printed at the end (scripts/gpu_check_summary.py)
#
# Lent GPU machines cut a command off at a hard limit, so the whole run keeps to GPU_CHECK_BUDGET_S
# seconds (default 540): every step runs under `timeout`, with at most its own cap (STEP_CAP_S below)
# and what is left of the budget when it starts, in order of importance; a step with under 20 s left is
# skipped; the scripts rewrite their JSON after every case, and the summary is always written.
# --rehearse has no caps, and no budget unless GPU_CHECK_BUDGET_S is set.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch" ]]; then
    set -e
    mkdir -p .whl
    # antlr4-python3-runtime 4.9.3 (what OmegaConf 2.3 needs) is published as a source archive only:
    # build its (pure-Python) wheel here.
    python3 -m pip wheel --no-deps -q -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
    ls .whl
    if [[ ! -d .published/DLSN/src ]]; then
        mkdir -p .published/DLSN
        if [[ -n "${DLSN_MIRROR:-}" ]]; then
            git -C "$DLSN_MIRROR" archive HEAD src | tar -x -C .published/DLSN
        else
            git clone -q --depth 1 https://github.com/laoyangui/DLSN .published/DLSN
        fi
    fi
    ls .published/DLSN/src/model/dlsn.py
    exit 0
fi

OUT="${OUT:?set OUT to the folder for the results}"
# Toy sizes for --rehearse, appended after the real options (argparse keeps the last value), so that the
# rehearsal runs the very command lines of the GPU run.
device=cuda information=false
toy_warm=() toy_check=() toy_train_step=() toy_gla=() toy_profile=() toy_precision=() toy_compile=() toy_weight_grad=()
for option in "$@"; do
    case "$option" in
        --rehearse) device=cpu ;;
        --information) information=true ;;
        *) echo "gpu_check.sh: unknown option '$option' (expected --fetch alone, or --rehearse and/or --information)" >&2
           exit 2 ;;
    esac
done
if [[ $device == cpu ]]; then
    toy_warm=(--small --workers 2 --max-tasks 2)  # the interpreter compiles nothing: two tasks test the plumbing
    toy_check=(--small)
    toy_train_step=(--n-feats 8 --n-resgroups 1 --n-resblocks 1 --chunk-size 16 --n-hashes 1 --batch 2 --patch 12
                    --warmup 1 --steps 4)
    toy_gla=(--smoke --repeats 1 --warmup 0)
    toy_compile=(--compile-backend eager)  # traces the GLA as on the GPU, compiles nothing
    toy_profile=(--device cpu --small)
    toy_weight_grad=(--small)
    toy_precision=(--model small --batch 2 --patch 16 --warmup 1 --steps 2 --train-steps 4
                   --train-timeout 900 --run-dir "$OUT/precision_runs")
fi

mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The project is not installed on the GPU machine: its scripts import dlsn from this working tree.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
# torch.compile's on-disk cache, empty at the start of every run: the compile steps measure the warm-up of
# a first run, and leave the compiled graphs there for train_step.
export TORCHINDUCTOR_CACHE_DIR="$(mktemp -d /tmp/gpu_check_inductor.XXXXXX)"
# One Triton cache for every process. Unset, Inductor points TRITON_CACHE_DIR at a folder of its own
# cache as soon as it loads a compiled kernel, and the fused GLA kernels launched after that would be
# compiled again there instead of found where the warm step put them.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$HOME/.triton/cache}"
[[ $device == cpu ]] && trap 'rm -rf "$TORCHINDUCTOR_CACHE_DIR"' EXIT
status=0
# Seconds each step may take at most on an H100/H200 (compilation included); the budget may leave less.
declare -A STEP_CAP_S=([warm]=120 [compile_bf16]=150 [compile_32]=150 [precision]=210 [check]=180 [train_step]=300
                        [gla_targets]=90 [gla_batch1_profile]=60 [gla_targets_bf16]=90 [train_step_heuristics]=60
                        [gla_compiled]=150 [weight_grad]=60)
if [[ $device == cuda ]]; then
    budget=${GPU_CHECK_BUDGET_S:-540}
else  # the rehearsal's toy sizes on a slow CPU: no caps
    budget=${GPU_CHECK_BUDGET_S:-100000}
    for name in "${!STEP_CAP_S[@]}"; do STEP_CAP_S[$name]=100000; done
fi

step() {  # step NAME COMMAND...: run with stdout and stderr to $OUT/NAME.txt, report its time and status
    local name="$1" start=$SECONDS rc limit
    shift
    limit=$((budget - SECONDS - 15))  # 15 s kept for the summary
    (( limit > STEP_CAP_S[$name] )) && limit=${STEP_CAP_S[$name]}
    if (( limit < 20 )); then
        echo "skipped: the budget of $budget s (GPU_CHECK_BUDGET_S) was spent" | tee "$OUT/$name.txt"
        status=1
        return 1
    fi
    echo "== $name (at most $limit s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    (( rc == 124 )) && echo "cut off after $limit s (gpu_check.sh budget)" >>"$OUT/$name.txt"
    echo "   exit status $rc after $((SECONDS - start)) s (output: $OUT/$name.txt)"
    [[ $rc -eq 0 ]] || { status=1; return 1; }
}

declare -A started_steps=()
start_step() {  # start_step NAME COMMAND...: step NAME in the background; wait_for_steps collects it
    step "$@" &
    started_steps[$1]=$!
}

wait_for_steps() {  # wait for every step start_step started; a failed one fails the run
    local name
    for name in "${!started_steps[@]}"; do
        wait "${started_steps[$name]}" || status=1
    done
    started_steps=()
}

{ if [[ $device == cuda ]]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  else echo "rehearsal on the CPU: toy sizes, nothing measured"; fi
  python3 -c "import torch, triton, lightning; print('torch', torch.__version__, 'triton', triton.__version__, 'lightning', lightning.__version__)"
} >"$OUT/gpu.txt" 2>&1
echo "== $(tr '\n' ' ' <"$OUT/gpu.txt")"

# The fused kernels' Triton compiles (more than a hundred, seconds each), in parallel processes: the steps below find
# them in Triton's cache instead of compiling them one at a time.
step warm python3 scripts/warm_kernel_cache.py --device $device "${toy_warm[@]}"

# Steps whose reported numbers no timing of theirs decides, at the same time: mostly compilation (CPU) and
# launch-bound training runs, which leave the GPU largely idle.
published=()
[[ -f .published/DLSN/src/model/dlsn.py ]] && published=(--published-src .published/DLSN/src)
# The compiled training step alone, one precision per process, from an empty torch.compile cache: the
# compile warm-up target (measured beside the other steps of this phase: an upper bound), and the graphs
# cached for train_step. The same command line as train_step's compiled cases, hence the same graphs.
for precision in bf16-mixed 32-true; do
    start_step "compile_${precision%%-*}" python3 scripts/benchmark_train_step.py --device $device --cases project-compiled \
        --precisions $precision --warmup 1 --steps 2 --matmul-precision high --json "$OUT/compile_${precision%%-*}.json" \
        "${toy_train_step[@]}"
done
# bf16 against float32 validation PSNR after a short train.py run (the target), and float32 once more with the
# same seed and settings (the measurement's noise: on 2026-11-28 such float32 runs at a constant rate ended 33.39
# to 34.30 dB, the reference attention's atomic additions sending each elsewhere; a bf16 difference no larger is
# INCONCLUSIVE). The runs' rate decays to 0 (benchmark_precision.py's default --schedule cosine), which on the
# CPU cut the spread of such differences about nineteenfold, to 0.048 dB. The three runs at once: cuDNN's
# autotuner and the timed choices are off in them, so sharing the GPU changes their time only. The step's
# speed is measured by train_step.
start_step precision python3 scripts/benchmark_precision.py --device $device --train-steps 200 \
    --repeat-float32 --skip-throughput --parallel-runs --train-timeout 190 --json "$OUT/precision.json" \
    --run-dir /tmp/precision_runs \
    "${toy_precision[@]}"
step check python3 scripts/check_fused_gla.py --device $device --json "$OUT/check.json" "${toy_check[@]}"
wait_for_steps

# Alone on the GPU from here. The headline: the training step, float32 with TF32 matrix products (as train.py's
# paper recipes) and bf16; its compiled cases find their graphs in the cache.
step train_step python3 scripts/benchmark_train_step.py --device $device "${published[@]}" --warmup 4 --steps 12 \
    --matmul-precision high --json "$OUT/train_step.json" "${toy_train_step[@]}"
# float32 with TF32 matrix products for every implementation (the fused kernel's float32 mode; bf16 below);
# the authors' own GLA and DLSN too where .published is there (issue 9's baseline)
# --kernel-table: each case profiled once more (three runs), its 25 largest kernels listed (where the row
# still short of its target, batch 16 96x96, spends its time: its ten largest held 15 of its 20 ms).
step gla_targets python3 scripts/benchmark_gla.py --device $device --targets "${published[@]}" --repeats 10 \
    --warmup 3 --matmul-precision high --kernel-table 25 --json "$OUT/gla_targets.json" --markdown "${toy_gla[@]}"

# Every target measured: how long that took, from the start (wheels installed, kernels compiled), for the summary.
duration() {  # duration INFORMATION_SECONDS_OR_null: write $OUT/duration.json
    printf '{"device": "%s", "targets_s": %d, "information_s": %s}\n' "$device" "$targets_s" "$1" >"$OUT/duration.json"
}
finish() {  # write and print the summary; exit with the run's status
    python3 scripts/gpu_check_summary.py "$OUT" >"$OUT/summary.md" 2>&1 || status=1
    echo
    cat "$OUT/summary.md"
    exit $status
}
targets_s=$SECONDS
duration null
[[ $information == true ]] || finish

# Information (--information). Why the batch-1 GLA rows are slow (host time, kernel launches, profiler tables), and the fused
# kernel's backward as each variant the training steps' timed choice tries (dQ by two kernels or atomic
# additions; key and values kernel configurations).
step gla_batch1_profile python3 scripts/profile_train_step.py --sections gla_batch1 backward_modes "${toy_profile[@]}"
# cuDNN's TF32 weight gradients (about a third of the TF32 peak on the last H200 run: 24 ms of the float32 eager
# step, 2.1 ms of the batch-16 96x96 GLA row) against im2col + cuBLAS and a Triton implicit GEMM.
step weight_grad python3 scripts/benchmark_weight_grad.py --device $device --json "$OUT/weight_grad.json" \
    "${toy_weight_grad[@]}"
# The model-level rows under bf16 autocast (no kernel tables, the float32 ones above suffice).
step gla_targets_bf16 python3 scripts/benchmark_gla.py --device $device --targets "${published[@]}" --repeats 10 \
    --warmup 3 --precision bf16 --json "$OUT/gla_targets_bf16.json" --markdown "${toy_gla[@]}"
# What cuDNN's autotuner (on in train_step, as in the paper recipes) gains over its heuristics: eager steps.
step train_step_heuristics python3 scripts/benchmark_train_step.py --device $device --cases project --warmup 4 \
    --steps 12 --matmul-precision high --cudnn-autotune off --json "$OUT/train_step_heuristics.json" "${toy_train_step[@]}"
# The GLA rows as the paper experiments' compiled training steps run the layer (CUDA graphs, Inductor's fusion of
# the elementwise work around the fused kernels; three shapes, three compilations), against the authors' code
# (with .published) and the published layout.
step gla_compiled python3 scripts/benchmark_gla.py --device $device --targets "${published[@]}" --impls published compiled \
    --kinds gla_forward_backward --repeats 10 --warmup 3 --matmul-precision high --json "$OUT/gla_compiled.json" \
    --markdown "${toy_gla[@]}" "${toy_compile[@]}"
duration $((SECONDS - targets_s))
finish
