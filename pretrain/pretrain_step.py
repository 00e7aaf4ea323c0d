"""Text pretraining of the Step 3.5 Flash model on Megatron-Core.

    # CPU, 1 process: tiny preset on the embedded corpus (what `make demo` runs)
    python pretrain/pretrain_step.py --config examples/tiny/tiny.yaml
    # CPU, 2 processes (DP=2; add parallel.tp=2 for tensor parallelism)
    torchrun --nproc-per-node 2 pretrain/pretrain_step.py --config examples/tiny/tiny.yaml
    # one GPU
    python pretrain/pretrain_step.py --config examples/tiny/tiny.yaml model.bf16=true
    # Slurm: 512 nodes x 8 GPUs, the report's layout
    sbatch examples/step35_flash/pretrain.sbatch
    # validate a layout and estimate per-GPU memory, no GPUs needed
    python pretrain/pretrain_step.py --config examples/step35_flash/step35_flash.yaml \
        --dry-run --world-size 4096

Overrides are `section.field=value` (sections: model, parallel, data, optim, train).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

# Megatron-Core announces missing TE/apex at import time; on CPU that is expected.
warnings.filterwarnings("ignore", message=".*not installed.*")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_step.config.run import load_run_config  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Step 3.5 Flash text pretraining (Megatron-Core)")
    ap.add_argument("--config", help="run YAML (model_preset + sections)")
    ap.add_argument("--resume", action="store_true", help="continue from <run_dir>/checkpoints/latest")
    ap.add_argument("--dry-run", action="store_true", help="validate the layout, print memory per GPU")
    ap.add_argument("--world-size", type=int, help="for --dry-run: number of GPUs")
    ap.add_argument("overrides", nargs="*", help="section.field=value")
    return ap.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    try:
        cfg = load_run_config(args.config, overrides)
    except ValueError as e:
        sys.exit(f"config error: {e}")

    if args.dry_run:
        from megatron_step.training.dry_run import dry_run, format_report

        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        try:
            print(format_report(dry_run(cfg, world)))
        except ValueError as e:
            sys.exit(f"layout error: {e}")
        return None

    from megatron_step import platform
    from megatron_step.training.loop import pretrain

    try:
        result = pretrain(cfg)
    finally:
        platform.teardown()
    if result["losses"]:
        print(
            f"done: steps {result['start'] + 1}-{result['start'] + len(result['losses'])}, "
            f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}, "
            f"validation loss {result['val_loss']:.4f}; run dir {result['run_dir']}"
        )
    return result


if __name__ == "__main__":  # the dist-checkpoint saver spawns processes: keep this guard
    main()
