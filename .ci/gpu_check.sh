#!/usr/bin/env bash
# GPU checks for a CUDA machine (CI has no GPU and does not run this). From the repo root, with the
# requirements installed (or PY pointing at a python that has them):
#   bash .ci/gpu_check.sh     # ~6 min on one H100/H200; logs in $LOGS, run dirs in $WORK (/tmp/gpu_check)
#   ONLY="gpu_tests mmrpt" bash .ci/gpu_check.sh    # just those steps
# 1. the tests marked `gpu` (FP8/TE ones skip when Transformer Engine is absent, saying so);
# 2. pretraining of the tiny preset on the GPU in bf16 (NCCL, no CPU patches);
# 3. RL on the GPU: warm-up, then E3RL rollouts + MIS-PO updates, held-out eval; then plain sync RL
#    steps from that warm-up (the engine with keyed sampling and length buckets). One GPU only: the
#    multi-rank paths (Lockstep's all-reduces, SP off for decode, padding microbatches) are the same
#    code the gloo tests run (tests/rl/test_rl_layouts.py); on NCCL their tensors live on the GPU;
# 4. the rollout benchmarks on the GPU (E3RL overhead; ragged prompts, one batch vs length buckets);
# 5. MMRPT on the GPU in bf16: shards, caption warm-up, MMRPT steps, held-out eval (DALI decodes on the
#    GPU when it is installed, else the webdataset reader is used).
set -uo pipefail
cd "$(dirname "$0")/.."
# the entry points import the package; without `make install` (an editable install) it is this checkout
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
WORK=${WORK:-/tmp/gpu_check}
LOGS=${LOGS:-$WORK/logs}
mkdir -p "$WORK" "$LOGS"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS CMD...: run, keep the log, report the exit code
    local name=$1 secs=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    echo "=== $name"
    timeout "$secs" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    grep -v -i "warn" "$LOGS/$name.log" | tail -n 12
    echo "=== $name: exit $rc"
    [ $rc -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__, torch.cuda.get_device_name())"
$PY -c "import transformer_engine" 2>/dev/null && echo "transformer-engine: present" || echo "transformer-engine: absent (FP8/TE tests skip)"
step gpu_tests 150 $PY -m pytest -m gpu -q -rs tests/platform tests/models tests/data
step pretrain 150 $PY pretrain/pretrain_step.py --config examples/tiny/tiny.yaml train.steps=40 \
    train.eval_interval=20 train.save_interval=40 model.bf16=true train.run_dir="$WORK/pretrain" train.overwrite=true \
    data.data_dir="$WORK/data"
step rl_e3rl 190 $PY posttrain/train_rl.py --config examples/rl/rl_tiny.yaml rl.sft_steps=60 \
    train.steps=6 train.eval_interval=3 rl.rollout=e3rl train.run_dir="$WORK/rl" train.overwrite=true rl.init_from="$WORK/rl/sft" \
    data.data_dir="$WORK/data"
step rl_sync 120 $PY posttrain/train_rl.py --config examples/rl/rl_tiny.yaml rl.sft_steps=60 \
    train.steps=4 train.eval_interval=4 train.run_dir="$WORK/rl_sync" train.overwrite=true rl.init_from="$WORK/rl/sft" \
    data.data_dir="$WORK/data"
step e3rl_overhead 80 $PY -m benchmarks.e3rl_overhead
step rollout_compare 150 $PY -m benchmarks.rollout_compare
step mmrpt 200 $PY pretrain/pretrain_mmrpt.py --config examples/mmrpt/mmrpt_tiny.yaml mmrpt.scenes=400 \
    mmrpt.heldout_scenes=32 mmrpt.warmup_steps=60 train.steps=4 mmrpt.eval_interval=2 model.bf16=true \
    train.run_dir="$WORK/mmrpt" train.overwrite=true mmrpt.init_from="$WORK/mmrpt/warmup" mmrpt.data_dir="$WORK/mmrpt_data"
exit $status
