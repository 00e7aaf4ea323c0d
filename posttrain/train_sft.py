"""Supervised fine-tuning of the Step 3.5 Flash model on chat conversations (loss on assistant turns).

    # CPU, 1 process: the tiny preset on the embedded chat data (arithmetic worked as conversations)
    python posttrain/train_sft.py --config examples/sft/sft_tiny.yaml
    # your conversations (JSONL, OpenAI `messages` or prompt/response), from a pretrained checkpoint
    python posttrain/train_sft.py --config examples/sft/sft_tiny.yaml \\
        'sft.train_files=[chats.jsonl]' 'sft.valid_files=[chats_valid.jsonl]' train.init_from=runs/sft_tiny
    # CPU, 2 processes (DP=2)
    torchrun --nproc-per-node 2 posttrain/train_sft.py --config examples/sft/sft_tiny.yaml \\
        train.run_dir=runs/sft_dp2

Overrides are `section.field=value` (sections: model, parallel, data, optim, train, sft).
The stage: megatron_step/stages/sft.py; the data and its checks: megatron_step/data/sft.py.
"""

from __future__ import annotations

import sys
import warnings

# Megatron-Core announces missing TE/apex when it is imported; on CPU that is expected.
warnings.filterwarnings("ignore", message=".*not installed.*")

from megatron_step import platform  # noqa: E402
from megatron_step.config.run import SFTRunConfig, cli_run_config  # noqa: E402
from megatron_step.data.chat import ChatError  # noqa: E402
from megatron_step.data.sft import SFTDataError  # noqa: E402
from megatron_step.stages.sft import train_sft  # noqa: E402
from megatron_step.training.checkpoint import RunDirError  # noqa: E402


def main(argv=None) -> dict:
    cfg, _ = cli_run_config("Step 3.5 Flash supervised fine-tuning on chat data", argv, SFTRunConfig)
    try:
        out = train_sft(cfg)
    except (SFTDataError, ChatError) as e:  # a file, a line, a template that cannot be trained on
        sys.exit(f"data error: {e}")
    except (RunDirError, FloatingPointError) as e:  # the run directory / too many inf-nan steps
        sys.exit(f"run error: {e}")
    finally:
        platform.teardown()
    d = out["data"]
    curve = out["val_curve"]
    val = "none"
    if curve:
        val = f"{curve[0][1]:.4f} (step {curve[0][0]}) -> {curve[-1][1]:.4f} (step {curve[-1][0]})"
    print(
        f"done: {d['train']['samples']} training conversations ({d['skipped']} lines skipped, "
        f"{d['train']['truncated']} cut to data.seq_length); validation loss {val}; run dir {out['run_dir']}"
    )
    return out


if __name__ == "__main__":  # the dist-checkpoint saver spawns processes: keep this guard
    main()
