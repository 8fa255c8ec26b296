#!/usr/bin/env bash
# GPU smoke test: the first thing to run on a new GPU machine or cluster. Sized for under 8 minutes on one
# GPU (not yet measured: nothing has run on a GPU); about 1.5-3 minutes with AGRO_SMOKE_CPU=1 on 2 cores.
#
#   bash tools/gpu_smoke.sh [WORK_DIR]            # or AGRO_SMOKE_DIR=WORK_DIR; default: a new mktemp dir
#   srun --gpus=1 bash tools/gpu_smoke.sh         # on a Slurm cluster
#   AGRO_SMOKE_CPU=1 bash tools/gpu_smoke.sh DIR  # the script itself on CPU (gloo, fp32; CI: tests/test_gpu_smoke_script.py)
#
# Everything is written under WORK_DIR (never into the repository): logs/<step>.log for each step,
# the tiny checkpoints and the run directories.
#
# Steps (each prints `[gpu_smoke] PASS <step>`, `FAIL <step>: reason` or `SKIP <step>: reason`, with
# its time; a failure does not stop later steps that do not need its output):
#   preflight        python / torch / CUDA / GPUs; without a GPU (and without AGRO_SMOKE_CPU=1) the
#                    script stops here with exit status 2
#   install          setup.py's CORE requirements that are missing (torch excepted: the machine's own
#                    CUDA torch is kept, pinned by a constraint), then `pip install --no-deps -e .`
#                    unless agro_megatron already imports from this checkout
#   detect           which optional GPU packages import (vllm, transformer_engine.pytorch) and whether the
#                    model would pick the TransformerEngine spec
#   cuda-stack       bf16 matmul and a 1-rank NCCL all-reduce on GPU 0                   (CUDA only)
#   fused-loss-op    agro_megatron.ops.vocab_parallel_logprobs (values and gradients, fp32 and bf16,
#                    128k vocabulary) against a float64 torch log_softmax reference
#   build-hf         a tiny Llama-3 (hidden 128, 2 layers, 4 heads / 2 KV, head_dim 64, vocab 300) written
#                    by transformers, warmed up by a short plain-torch SFT so that RL rewards vary
#   import           agro-convert import (bf16 on GPU, fp32 on CPU)
#   train-native     agro-train, 6 agro_on steps with an evaluation at step 3: native sampler,
#                    megatron-core's local layer spec (forced even where TransformerEngine imports), NCCL
#   train-te         the same with the TransformerEngine spec        (when transformer_engine imports + CUDA)
#   train-vllm       the same with rollout.engine=vllm, sleep level 2 (when vllm imports + CUDA)
#   offline-native   algorithm.regime=offline: offline data generated from pi_ref, then 1 step
#   stale-native     algorithm.regime=stale, staleness 1, 2 steps
#   stale-vllm       the same with the vLLM engine                   (when vllm imports + CUDA)
#   resume           train-native again with train.steps=8 in the same logging dir: resumes at step 6
#   export           agro-convert export of <run>/final_model; transformers' logits of the export vs
#                    the Megatron checkpoint's own (fp32 both sides, and bf16 as trained)
#   tp2              torchrun --nproc-per-node 2 -m agro_megatron.train ... parallel.tp=2 (2+ GPUs;
#                    on CPU only with AGRO_SMOKE_TP2=1)
# The last line is exactly `gpu_smoke passed=<k>/<n> skipped=<s>`; the exit status is 1 if a step failed.
#
# Environment:
#   AGRO_PYTHON          interpreter (default: python3, else python); torch must already import in it
#   AGRO_WHEELS          a wheel directory: missing packages come from it (pip --no-index --find-links), for
#                        nodes without network; fill it where PyPI is reachable with `pip download -d DIR`
#                        of the packages the install step names, for the node's Python version and platform
#   AGRO_SMOKE_CPU=1     run on CPU (GPUs hidden): gloo, fp32, the CUDA-only steps skipped with a reason
#   AGRO_SMOKE_TP2=1     also run the TP=2 step on CPU (2 gloo processes)
#   AGRO_SMOKE_WARMUP_STEPS  SFT warm-up steps of build-hf (default 300 on GPU, 10 on CPU). With >= 200 the
#                    policy answers some problems right and the training steps must show learning: a
#                    non-zero gradient and KL(policy || reference) <= 5; with fewer, rewards stay 0
#   AGRO_SMOKE_DTYPE     fp32 | bf16 (default bf16 on GPU, fp32 on CPU)
#   AGRO_SMOKE_STEP_LIMIT    seconds allowed per step (default 300)
#   AGRO_SMOKE_SKIP      step names not to run (space or comma separated), e.g. "stale-vllm tp2" when
#                        device time is short; they are reported as SKIP
#   AGRO_SMOKE_NO_INSTALL=1  never pip-install anything (the install step only reports what is missing)
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPER="$REPO/tools/gpu_smoke_helper.py"
T_START=$(date +%s)

say() { echo "[gpu_smoke] $*"; }
die() { echo "gpu_smoke: $*" >&2; exit 2; }

# ------------------------------------------------------------------ work dir, interpreter, mode
WORK=${1:-${AGRO_SMOKE_DIR:-}}
if [ -n "$WORK" ]; then
    WORK=$(realpath -m "$WORK")
    case "$WORK/" in "$REPO"/*) die "work dir $WORK is inside the repository; pass a directory outside it" ;; esac
    # The steps replace their own outputs (hf/, mcore/, runs/<step>/, exported/): only in an empty dir or one
    # this script made, never in an arbitrary directory that happens to hold files of those names.
    if [ -d "$WORK" ] && [ -n "$(ls -A "$WORK" 2>/dev/null)" ] && [ ! -e "$WORK/.agro_gpu_smoke" ]; then
        die "work dir $WORK is not empty and was not made by this script; pass a new or empty directory"
    fi
fi

if [ -n "${AGRO_WHEELS:-}" ]; then
    [ -d "$AGRO_WHEELS" ] || die "AGRO_WHEELS=$AGRO_WHEELS is not a directory"
    AGRO_WHEELS=$(cd "$AGRO_WHEELS" && pwd); export AGRO_WHEELS
fi

PY=${AGRO_PYTHON:-}
if [ -z "$PY" ]; then PY=$(command -v python3 || command -v python || true); fi
[ -n "$PY" ] && [ -x "$(command -v "$PY")" ] || die "no python interpreter found (set AGRO_PYTHON)"

CPU_MODE=0
if [ "${AGRO_SMOKE_CPU:-0}" = "1" ]; then
    CPU_MODE=1
    export CUDA_VISIBLE_DEVICES=""   # a CPU run hides any GPU: everything runs on gloo + CPU tensors
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # agro_megatron from this checkout, installed or not

TORCH_ERR=$(mktemp)
TORCH_INFO=$("$PY" -c "import torch; print(torch.__version__, torch.version.cuda, int(torch.cuda.is_available()), torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>"$TORCH_ERR")
TORCH_WHY=$(tail -n 1 "$TORCH_ERR"); rm -f "$TORCH_ERR"
if [ -z "$TORCH_INFO" ]; then
    die "torch does not import in $PY ($TORCH_WHY). Install a CUDA build of torch first (2.11 or newer; pip install -e \".[gpu]\" installs torch==2.13.0, built for CUDA 13.0), or point AGRO_PYTHON at an environment that has one."
fi
read -r TORCH_VERSION TORCH_CUDA HAS_CUDA NGPUS <<<"$TORCH_INFO"
if [ "$CPU_MODE" = 0 ] && [ "$HAS_CUDA" != 1 ]; then
    die "no CUDA GPU is visible to torch $TORCH_VERSION (built for CUDA $TORCH_CUDA; nvidia-smi: $(nvidia-smi -L 2>/dev/null | head -n 1 || echo 'not found')). Run it on a GPU node (e.g. srun --gpus=1 bash tools/gpu_smoke.sh), or set AGRO_SMOKE_CPU=1 to test this script on CPU."
fi
if [ -z "$WORK" ]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/agro-gpu-smoke.XXXXXX") || die "cannot create a work dir"
fi
mkdir -p "$WORK/logs" || die "cannot create work dir $WORK"
touch "$WORK/.agro_gpu_smoke"
if [ "$CPU_MODE" = 1 ]; then
    DTYPE=${AGRO_SMOKE_DTYPE:-fp32}; MODE="cpu (AGRO_SMOKE_CPU=1: gloo, $DTYPE)"; WARMUP=${AGRO_SMOKE_WARMUP_STEPS:-10}
    FP32_TOL=1e-4; NGPUS=0; LIMIT=${AGRO_SMOKE_STEP_LIMIT:-300}
else
    DTYPE=${AGRO_SMOKE_DTYPE:-bf16}; MODE="gpu (NCCL, $DTYPE)"; WARMUP=${AGRO_SMOKE_WARMUP_STEPS:-300}
    FP32_TOL=2e-3; LIMIT=${AGRO_SMOKE_STEP_LIMIT:-300}
fi
case "$DTYPE" in fp32|bf16) ;; *) die "AGRO_SMOKE_DTYPE=$DTYPE: use fp32 or bf16" ;; esac
# A warmed-up policy (>= 200 SFT steps) answers some problems right, so rewards vary: then every RL step
# must move the policy (non-zero gradient), and only a little (KL to the reference stays small).
if [ "$WARMUP" -ge 200 ]; then
    LEARN=1; SIZES="rollout.n=4 train.prompts_per_step=4 rollout.max_new_tokens=40"   # room for an answer
    EXPECT="--expect-updates --max-kl 5"; KL_CHECK="--max-kl 5"
else  # a (nearly) random policy: rewards are all 0, gradients 0; only the plumbing is checked
    LEARN=0; SIZES="rollout.n=2 train.prompts_per_step=2 rollout.max_new_tokens=16"
    EXPECT=""; KL_CHECK=""
fi

SCRIPTS=$("$PY" -c "import sysconfig; print(sysconfig.get_path('scripts'))")
cli() {  # cli NAME: the console script next to $PY, else python -m of its module
    if [ -x "$SCRIPTS/agro-$1" ]; then echo "$SCRIPTS/agro-$1"; else echo "$PY -m agro_megatron.cli.$1"; fi
}

# ------------------------------------------------------------------ step bookkeeping
declare -A STATUS
ORDER=()
N_PASS=0; N_FAIL=0; N_SKIP=0

record() {  # record NAME STATUS SECONDS TEXT
    STATUS[$1]=$2; ORDER+=("$1|$2|$3")
    case $2 in PASS) N_PASS=$((N_PASS + 1)) ;; FAIL) N_FAIL=$((N_FAIL + 1)) ;; SKIP) N_SKIP=$((N_SKIP + 1)) ;; esac
}

skip() {  # skip NAME REASON
    say "SKIP $1: $2"
    record "$1" SKIP 0 "$2"
}

# needs STEP...: prints why the current step cannot run (empty when every STEP passed)
needs() {
    local s
    for s in "$@"; do
        if [ "${STATUS[$s]:-}" != PASS ]; then echo "needs $s, which ${STATUS[$s]:-did not run}"; return; fi
    done
}

# run NAME FUNCTION [ARGS...]: FUNCTION runs in its own bash (exported), output to logs/NAME.log, under
# a time limit. A line `DETAIL: ...` in its output is shown after PASS; on failure the reason is its
# last `check failed:` line, else the last error-looking line, else the last line.
run() {
    local name=$1 fn=$2; shift 2
    local log="$WORK/logs/$name.log" t0 t1 rc dt reason detail
    local skiplist="${AGRO_SMOKE_SKIP:-}"
    if [[ " ${skiplist//,/ } " == *" $name "* ]]; then
        skip "$name" "listed in AGRO_SMOKE_SKIP"
        return 1
    fi
    t0=$(date +%s.%N)
    timeout --kill-after=20 "$LIMIT" bash -c "$fn \"\$@\"" "$fn" "$@" >"$log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    if [ "$rc" = 0 ]; then
        detail=$(grep '^DETAIL: ' "$log" | tail -n 1 | cut -c9-400)
        say "PASS $name [${dt} s]${detail:+ $detail}"
        record "$name" PASS "$dt" "$detail"
        return 0
    fi
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        reason="timed out after ${LIMIT} s"
    else
        # the step's own verdict, and the last exception/error line (what went wrong inside)
        reason=$(grep -E '^(check failed:|REASON:)' "$log" | tail -n 1 | sed 's/^REASON: //')
        local err
        err=$(grep -E '^([A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Interrupt)\b|\[rank[0-9]+\]: [A-Za-z_.]*(Error|Exception)\b|agro-[a-z]+: |RuntimeError|AssertionError)' "$log" \
              | grep -v -i 'warn' | tail -n 1)
        if [ -z "$reason" ]; then
            reason=${err:-$(grep -v '^[[:space:]]*$' "$log" | tail -n 1)}
        elif [ -n "$err" ] && [[ "$reason" != check\ failed:* ]]; then
            reason="$reason: $err"
        fi
        reason="$(echo "$reason" | cut -c1-500) (exit $rc)"
    fi
    say "FAIL $name: $reason [${dt} s; log: $log]"
    tail -n 25 "$log" | sed 's/^/    | /'
    record "$name" FAIL "$dt" "$reason"
    return 1
}

# ------------------------------------------------------------------ step bodies (run in child bashes)
s_install() {
    local src=()
    if [ -n "${AGRO_WHEELS:-}" ]; then src=(--no-index --find-links "$AGRO_WHEELS"); fi
    echo "torch==$TORCH_VERSION" >"$WORK/torch-constraint.txt"   # keep the machine's torch
    pip_install() { echo "+ pip install $*"; "$PY" -m pip install --no-input --progress-bar off "${src[@]}" "$@"; }
    if ! "$PY" -c "import packaging.requirements" 2>/dev/null; then
        [ "${AGRO_SMOKE_NO_INSTALL:-0}" = 1 ] && { echo "REASON: packaging is missing (AGRO_SMOKE_NO_INSTALL=1)"; return 1; }
        pip_install -c "$WORK/torch-constraint.txt" packaging || return 1
    fi
    local missing=() out
    out=$("$PY" "$HELPER" missing-deps) || { echo "REASON: could not read setup.py's requirements"; return 1; }
    [ -z "$out" ] || mapfile -t missing <<<"$out"
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "missing: ${missing[*]}"
        if [ "${AGRO_SMOKE_NO_INSTALL:-0}" = 1 ]; then echo "REASON: missing ${missing[*]} (AGRO_SMOKE_NO_INSTALL=1)"; return 1; fi
        pip_install -c "$WORK/torch-constraint.txt" "${missing[@]}" || { echo "REASON: pip could not install ${missing[*]}"; return 1; }
        out=$("$PY" "$HELPER" missing-deps) || return 1
        [ -z "$out" ] || { echo "REASON: still missing after pip: $(echo $out)"; return 1; }
    fi
    local where
    where=$(cd "$WORK" && env -u PYTHONPATH "$PY" -c "import agro_megatron, os; print(os.path.dirname(os.path.dirname(os.path.abspath(agro_megatron.__file__))))" 2>/dev/null)
    if [ "$where" = "$REPO" ] && [ -x "$SCRIPTS/agro-train" ] && [ -x "$SCRIPTS/agro-convert" ]; then
        if [ "${#missing[@]}" -gt 0 ]; then echo "DETAIL: installed ${missing[*]}; agro-megatron already installed from $REPO"
        else echo "DETAIL: nothing missing; agro-megatron already installed from $REPO"; fi
        return 0
    fi
    [ "${AGRO_SMOKE_NO_INSTALL:-0}" = 1 ] && { echo "REASON: agro-megatron is not installed from $REPO (AGRO_SMOKE_NO_INSTALL=1)"; return 1; }
    local iso=()
    "$PY" -c "import setuptools" 2>/dev/null && iso=(--no-build-isolation)
    pip_install --no-deps "${iso[@]}" -e "$REPO" || { echo "REASON: pip install --no-deps -e . failed"; return 1; }
    echo "DETAIL: installed ${missing[*]:-no dependencies} and agro-megatron (editable, --no-deps) from $REPO"
}

s_env() {
    "$PY" "$HELPER" env --out "$WORK/env.json" || return 1
    echo "DETAIL: $("$PY" -c "
import json, sys
d = json.load(open(sys.argv[1]))
yn = lambda k: 'yes' if d.get(k) else 'no (' + (d.get(k + '_error') or '?') + ')'
print('vllm ' + yn('vllm') + '; transformer_engine ' + yn('transformer_engine') + '; default layer spec '
      + ('transformer_engine' if d.get('te_spec') else 'local') + (('; GPUs ' + ', '.join(d['gpu_names'])) if d.get('gpu_names') else ''))
" "$WORK/env.json")"
}

s_helper() {  # s_helper ARGS...: one helper command; its last line is the detail
    local out="$WORK/logs/$1.out"
    "$PY" "$HELPER" "$@" | tee "$out"
    [ "${PIPESTATUS[0]}" = 0 ] || return 1
    echo "DETAIL: $(grep -v '^[[:space:]]*$' "$out" | tail -n 1)"
}

s_build_hf() {
    rm -rf "$WORK/hf"
    "$PY" "$HELPER" build-hf "$WORK/hf" --sft-steps "$WARMUP" | tee "$WORK/logs/build-hf.out"
    [ "${PIPESTATUS[0]}" = 0 ] || return 1
    echo "DETAIL: $(tail -n 1 "$WORK/logs/build-hf.out" | sed "s#$WORK/##")"
}

s_import() {
    $(cli convert) import --hf "$WORK/hf" --out "$WORK/mcore" --tp 1 --dtype "$DTYPE" --overwrite --quiet || return 1
    echo "DETAIL: $WORK/mcore ($DTYPE, TP=1)"
}

# The shared overrides of every training run: tiny data, short responses, few evaluation problems.
common_args() {
    echo "$REPO/examples/tiny_cpu.yaml model.megatron_checkpoint=$WORK/mcore model.dtype=$DTYPE sft.steps=0" \
         "eval.every=3 eval.n=2 eval.max_problems=4 data.synthetic_train_size=16 data.synthetic_heldout_size=4" \
         "$SIZES checkpoint.save_every=3 logging.progress=false"
}

# train_with SPEC LOG ARGS...: agro-train (SPEC=auto: the model's own choice), or the helper that forces
# megatron-core's local spec where TransformerEngine would be picked; output to stdout and LOG.
train_with() {
    local spec=$1; shift
    if [ "$spec" = local ] && [ "$TE_SPEC" = 1 ]; then
        echo "+ gpu_smoke_helper.py train --spec local -- $*"
        "$PY" "$HELPER" train --spec local -- "$@"
    else
        echo "+ agro-train $*"
        $(cli train) "$@"
    fi
}

s_train() {  # s_train NAME SPEC STEPS CHECK_ARGS -- EXTRA_OVERRIDES...
    local name=$1 spec=$2 steps=$3 check=$4; shift 5
    local dir="$WORK/runs/$name"
    rm -rf "$dir"
    # shellcheck disable=SC2046
    train_with "$spec" $(common_args) train.steps="$steps" logging.dir="$dir" "$@" || { echo "REASON: agro-train exited non-zero"; return 1; }
    # shellcheck disable=SC2086
    "$PY" "$HELPER" check-run "$dir" --steps "$steps" $check | tee "$WORK/logs/$name.check"
    [ "${PIPESTATUS[0]}" = 0 ] || return 1
    echo "DETAIL: $(tail -n 1 "$WORK/logs/$name.check" | sed "s#$WORK/##")"
}

s_resume() {
    local dir="$WORK/runs/train-native"
    # shellcheck disable=SC2046
    train_with local $(common_args) train.steps=8 logging.dir="$dir" | tee "$WORK/logs/resume.out"
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "REASON: agro-train exited non-zero"; return 1; }
    grep -E "resumed from .*step_000006 at step 6" "$WORK/logs/resume.out" \
        || { echo "REASON: the log does not say 'resumed from .../step_000006 at step 6'"; return 1; }
    # shellcheck disable=SC2086
    "$PY" "$HELPER" check-run "$dir" --steps 8 --eval-at 3 8 $KL_CHECK | tee "$WORK/logs/resume.check"
    [ "${PIPESTATUS[0]}" = 0 ] || return 1
    echo "DETAIL: $(grep -o 'resumed from .*' "$WORK/logs/resume.out" | tail -n 1 | sed "s#$WORK/##"); trained to step 8"
}

s_export() {
    local ckpt="$WORK/runs/train-native/final_model"
    $(cli convert) export --megatron "$ckpt" --out "$WORK/exported" --overwrite --quiet || { echo "REASON: agro-convert export failed"; return 1; }
    "$PY" "$HELPER" compare-export "$ckpt" "$WORK/exported" --original "$WORK/hf" --fp32-tol "$FP32_TOL" --bf16-tol 5e-2 \
        | tee "$WORK/logs/export.check"
    [ "${PIPESTATUS[0]}" = 0 ] || return 1
    echo "DETAIL: $(tail -n 1 "$WORK/logs/export.check")"
}

s_tp2() {
    local dir="$WORK/runs/tp2"
    rm -rf "$dir"
    echo "+ torchrun --nproc-per-node 2 -m agro_megatron.train ... parallel.tp=2"
    # shellcheck disable=SC2046
    "$PY" -m torch.distributed.run --nproc-per-node 2 --master-port "$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
        -m agro_megatron.train $(common_args) parallel.tp=2 train.steps=1 eval.every=0 logging.dir="$dir" \
        || { echo "REASON: torchrun exited non-zero"; return 1; }
    "$PY" "$HELPER" check-run "$dir" --steps 1 | tee "$WORK/logs/tp2.check"
    [ "${PIPESTATUS[0]}" = 0 ] || return 1
    echo "DETAIL: TP=2 x DP=1, $(tail -n 1 "$WORK/logs/tp2.check" | sed "s#$WORK/##")"
}

export REPO HELPER WORK PY DTYPE WARMUP FP32_TOL SCRIPTS TORCH_VERSION CPU_MODE SIZES KL_CHECK
export -f say cli common_args train_with s_install s_env s_helper s_build_hf s_import s_train s_resume s_export s_tp2

# ------------------------------------------------------------------ the steps
say "work dir $WORK; repo $REPO; python $PY; torch $TORCH_VERSION (CUDA $TORCH_CUDA); mode $MODE; GPUs $NGPUS"
if [ "$LEARN" = 1 ]; then say "SFT warm-up $WARMUP steps: RL steps must move the policy (grad > 0) and stay near the reference (KL <= 5)"
else say "SFT warm-up $WARMUP steps (< 200): rewards stay 0, so the RL checks cover the plumbing, not learning"; fi
say "PASS preflight [0.0 s] python $("$PY" -c 'import sys; print(sys.version.split()[0])'), torch $TORCH_VERSION, CUDA build $TORCH_CUDA, $NGPUS GPU(s), mode $MODE"
record preflight PASS 0 ""

run install s_install
TE_SPEC=0; HAVE_VLLM=0; HAVE_TE=0; VLLM_WHY="vllm does not import"; TE_WHY="transformer_engine does not import"
if run detect s_env; then
    eval "$("$PY" - "$WORK/env.json" <<'PY'
import json, shlex, sys
d = json.load(open(sys.argv[1]))
print(f"TE_SPEC={int(bool(d.get('te_spec')))} HAVE_VLLM={int(bool(d.get('vllm')))} HAVE_TE={int(bool(d.get('transformer_engine')))}")
print(f"VLLM_WHY={shlex.quote('vllm does not import: ' + (d.get('vllm_error') or '?'))}")
print(f"TE_WHY={shlex.quote('transformer_engine.pytorch does not import: ' + (d.get('transformer_engine_error') or '?'))}")
PY
)"
fi
export TE_SPEC

if [ "$CPU_MODE" = 1 ]; then
    skip cuda-stack "CUDA-only check (AGRO_SMOKE_CPU=1)"
else
    run cuda-stack s_helper cuda-stack
fi
if [ "$CPU_MODE" = 1 ]; then
    run fused-loss-op s_helper fused-loss-op --device cpu
else
    run fused-loss-op s_helper fused-loss-op --device cuda
fi
run build-hf s_build_hf
why=$(needs build-hf); if [ -n "$why" ]; then skip import "$why"; else run import s_import; fi

why=$(needs import)
if [ -n "$why" ]; then skip train-native "$why"; else
    run train-native s_train train-native local 6 "--eval-at 3 $EXPECT" --
fi

if [ "$CPU_MODE" = 1 ]; then skip train-te "TransformerEngine needs CUDA (AGRO_SMOKE_CPU=1)"
elif [ "$HAVE_TE" != 1 ] || [ "$TE_SPEC" != 1 ]; then skip train-te "$TE_WHY"
elif [ -n "$why" ]; then skip train-te "$why"
else run train-te s_train train-te auto 6 "--eval-at 3 $EXPECT" --
fi

VLLM_ARGS="rollout.engine=vllm rollout.vllm_sleep_level=2"
if [ "$CPU_MODE" = 1 ]; then skip train-vllm "the vLLM steps need CUDA (AGRO_SMOKE_CPU=1)"
elif [ "$HAVE_VLLM" != 1 ]; then skip train-vllm "$VLLM_WHY"
elif [ -n "$why" ]; then skip train-vllm "$why"
else
    # shellcheck disable=SC2086
    run train-vllm s_train train-vllm auto 6 "--eval-at 3 $EXPECT" -- $VLLM_ARGS
fi

if [ -n "$why" ]; then skip offline-native "$why"; else
    rm -f "$WORK/offline.jsonl"
    run offline-native s_train offline-native auto 1 "--offline-fraction 1.0 $KL_CHECK" -- \
        algorithm.regime=offline algorithm.offline_data="$WORK/offline.jsonl"
fi
if [ -n "$why" ]; then skip stale-native "$why"; else
    run stale-native s_train stale-native auto 2 "$KL_CHECK" -- algorithm.regime=stale algorithm.staleness=1
fi
if [ "$CPU_MODE" = 1 ]; then skip stale-vllm "the vLLM steps need CUDA (AGRO_SMOKE_CPU=1)"
elif [ "$HAVE_VLLM" != 1 ]; then skip stale-vllm "$VLLM_WHY"
elif [ -n "$why" ]; then skip stale-vllm "$why"
else
    # shellcheck disable=SC2086
    run stale-vllm s_train stale-vllm auto 2 "$KL_CHECK" -- algorithm.regime=stale algorithm.staleness=1 $VLLM_ARGS
fi

why=$(needs train-native)
if [ -n "$why" ]; then skip resume "$why"; else run resume s_resume; fi
if [ -n "$why" ]; then skip export "$why"; else run export s_export; fi

why=$(needs import)
if [ "$CPU_MODE" = 1 ] && [ "${AGRO_SMOKE_TP2:-0}" != 1 ]; then skip tp2 "needs 2 GPUs (AGRO_SMOKE_CPU=1; AGRO_SMOKE_TP2=1 runs it on 2 gloo processes)"
elif [ "$CPU_MODE" = 0 ] && [ "$NGPUS" -lt 2 ]; then skip tp2 "needs 2 GPUs, $NGPUS visible"
elif [ -n "$why" ]; then skip tp2 "$why"
else run tp2 s_tp2
fi

# ------------------------------------------------------------------ summary
N=$((N_PASS + N_FAIL + N_SKIP))
say "summary ($(( $(date +%s) - T_START )) s in all; logs in $WORK/logs):"
for row in "${ORDER[@]}"; do
    IFS='|' read -r name st dt <<<"$row"
    printf '[gpu_smoke]   %-4s %-15s %6s s\n' "$st" "$name" "$dt"
done
echo "gpu_smoke passed=$N_PASS/$N skipped=$N_SKIP"
[ "$N_FAIL" = 0 ]
