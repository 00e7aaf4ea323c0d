"""Text pretraining of the Step 3.5 Flash model on Megatron-Core.

    # CPU, 1 process: tiny preset on the embedded corpus (what `make demo` runs)
    python pretrain/pretrain_step.py --config examples/tiny/tiny.yaml
    # CPU, 2 processes (DP=2; add parallel.tp=2 for tensor parallelism)
    torchrun --nproc-per-node 2 pretrain/pretrain_step.py --config examples/tiny/tiny.yaml
    # one GPU
    python pretrain/pretrain_step.py --config examples/tiny/tiny.yaml model.bf16=true
    # Slurm: 512 nodes x 8 GPUs, the report's layout (docs/design.md §4)
    sbatch examples/step35_flash/pretrain.sbatch
    # MTP staging (docs/design.md): MTP-1 alone, then a joint phase with MTP-2/3 copied from MTP-1
    python pretrain/pretrain_step.py --config examples/tiny/tiny.yaml \
        'model.mtp_loss_weights=[0.3,0.0,0.0]' train.run_dir=runs/mtp1
    python pretrain/pretrain_step.py --config examples/tiny/tiny.yaml train.steps=50 \
        train.init_from=runs/mtp1 train.mtp_init_from_first=true train.run_dir=runs/mtp_joint
    # validate a layout and estimate per-GPU memory, no GPUs needed
    python pretrain/pretrain_step.py --config examples/step35_flash/step35_flash.yaml \
        --dry-run --world-size 4096

Overrides are `section.field=value` (sections: model, parallel, data, optim, train).
The stage: megatron_step/stages/pretrain.py.
"""

from __future__ import annotations

import os
import sys
import warnings

# Megatron-Core announces missing TE/apex when it is imported; on CPU that is expected.
warnings.filterwarnings("ignore", message=".*not installed.*")

from megatron_step import platform  # noqa: E402
from megatron_step.config.run import PretrainConfig, cli_run_config  # noqa: E402
from megatron_step.stages.pretrain import dry_run, pretrain  # noqa: E402
from megatron_step.training.checkpoint import RunDirError  # noqa: E402
from megatron_step.training.dry_run import format_report  # noqa: E402


def _args(ap):
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue from <run_dir>'s newest checkpoint (train.resume=auto)",
    )
    ap.add_argument("--dry-run", action="store_true", help="validate the layout, print memory per GPU")
    ap.add_argument("--world-size", type=int, help="for --dry-run: number of GPUs")


def main(argv=None) -> dict | None:
    cfg, args = cli_run_config("Step 3.5 Flash text pretraining (Megatron-Core)", argv, PretrainConfig, _args)
    if args.resume:
        cfg.train.resume = "auto"
    if args.dry_run:
        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        try:
            print(format_report(dry_run(cfg, world)))
        except ValueError as e:
            sys.exit(f"layout error: {e}")
        return None
    try:
        result = pretrain(cfg)
    except (RunDirError, FloatingPointError) as e:  # the run directory / too many inf-nan steps
        sys.exit(f"run error: {e}")
    finally:
        platform.teardown()
    if result["losses"]:
        val = result["val_loss"]  # None when no validation ran (train.eval_interval=0 and an early stop)
        print(
            f"done: steps {result['start'] + 1}-{result['start'] + len(result['losses'])}, "
            f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}, "
            f"validation loss {'-' if val is None else f'{val:.4f}'}; run dir {result['run_dir']}"
        )
    return result


if __name__ == "__main__":  # the dist-checkpoint saver spawns processes: keep this guard
    main()
