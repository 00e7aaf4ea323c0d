"""Off-policy RL of the Step 3.5 Flash model with colocated inference (no Ray, no separate server).

    # CPU, 1 process: tiny preset on generated arithmetic (supervised warm-up first if needed)
    python posttrain/train_rl.py --config examples/rl/rl_tiny.yaml
    # async: generate step k+1 on a synced replica while training step k, staleness cap 1
    python posttrain/train_rl.py --config examples/rl/rl_tiny.yaml rl.async_mode=true rl.max_staleness=1
    # CPU, 2 processes (DP=2): each rank generates and trains on half of the prompts
    torchrun --nproc-per-node 2 posttrain/train_rl.py --config examples/rl/rl_tiny.yaml
    # one GPU
    python posttrain/train_rl.py --config examples/rl/rl_tiny.yaml model.bf16=true
    # your problems (JSONL: prompt, label, data_source), each source scored by its reward, from SFT
    python posttrain/train_rl.py --config examples/rl/rl_tiny.yaml rl.task=dataset \
        'rl.data.train=[examples/rl/problems_tiny.jsonl]' \
        'rl.data.eval=[examples/rl/problems_tiny_eval.jsonl]' rl.data.rewards.mbpp=code \
        rl.init_from=runs/sft_tiny model.seq_length=128 train.run_dir=runs/rl_data

Overrides are `section.field=value` (sections: model, parallel, data, optim, train, rl).
The stage: megatron_step/stages/rl.py; losses (GRPO/TIS/MIS-PO): megatron_step/rl/losses.py.
"""

from __future__ import annotations

import sys
import warnings

# Megatron-Core announces missing TE/apex when it is imported; on CPU that is expected.
warnings.filterwarnings("ignore", message=".*not installed.*")

from megatron_step import platform  # noqa: E402
from megatron_step.config.run import RLRunConfig, cli_run_config  # noqa: E402
from megatron_step.data.chat import ChatError  # noqa: E402
from megatron_step.rl.dataset import RLDataError  # noqa: E402
from megatron_step.stages.rl import train_rl  # noqa: E402
from megatron_step.training.checkpoint import RunDirError  # noqa: E402


def main(argv=None) -> dict:
    cfg, _ = cli_run_config("Step 3.5 Flash off-policy RL (Megatron-Core)", argv, RLRunConfig)
    try:
        out = train_rl(cfg)
    except (RLDataError, ChatError) as e:  # a problem file, a line, a field, a template that cannot be used
        sys.exit(f"data error: {e}")
    except (RunDirError, FloatingPointError) as e:  # the run directory / too many inf-nan steps
        sys.exit(f"run error: {e}")
    finally:
        platform.teardown()
    acc = out["accuracy"]  # a resumed run has no step-0 evaluation; an early stop may have none after it
    held = "not evaluated"
    if acc:
        held = f"{acc[0][1]:.3f} (step {acc[0][0]}) -> {acc[-1][1]:.3f} (step {acc[-1][0]})"
    print(
        f"done: held-out accuracy {held}; reward failures {out['reward_failures']}; "
        f"max staleness {max(out['staleness'], default=0)}; run dir {out['run_dir']}"
    )
    return out


if __name__ == "__main__":  # the dist-checkpoint saver spawns processes: keep this guard
    main()
