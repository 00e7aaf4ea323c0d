"""MMRPT: masked multimodal RL pretraining of the image-text Step model on webdataset shards.

    # CPU, 1 process: generated scenes (written once under mmrpt.data_dir), caption warm-up if
    # mmrpt.init_from has no checkpoint, then MMRPT from it
    python pretrain/pretrain_mmrpt.py --config examples/mmrpt/mmrpt_tiny.yaml
    # the caption-imitation baseline from the same warm-up checkpoint
    python pretrain/pretrain_mmrpt.py --config examples/mmrpt/mmrpt_tiny.yaml mmrpt.objective=caption \\
        train.run_dir=runs/mmrpt_tiny_caption
    # your own shards (tools/make_wds_shards.py --images DIR --captions FILE), DALI reader
    python pretrain/pretrain_mmrpt.py --config examples/mmrpt/mmrpt_tiny.yaml \\
        mmrpt.shards='data/wds/shard-{000000..000099}.tar' mmrpt.reader=dali
    # CPU, 2 processes (DP=2; parallel.tp=2 for tensor parallelism)
    torchrun --nproc-per-node 2 pretrain/pretrain_mmrpt.py --config examples/mmrpt/mmrpt_tiny.yaml

Overrides are `section.field=value` (sections: model, parallel, optim, train, mmrpt; nested:
mmrpt.vision.<field>, mmrpt.loss.<field>). The stage: megatron_step/stages/mmrpt.py.
A run directory that already holds a run is refused at start: `train.resume=auto` continues it
(exactly), `train.overwrite=true` starts it over (the caption warm-up under <run_dir>/warmup is kept),
or give another `train.run_dir=` (docs/reliability.md).
"""

from __future__ import annotations

import sys
import warnings

# Megatron-Core announces missing TE/apex when it is imported; on CPU that is expected.
warnings.filterwarnings("ignore", message=".*not installed.*")

from megatron_step import platform  # noqa: E402
from megatron_step.config.run import MMRPTRunConfig, cli_run_config  # noqa: E402
from megatron_step.stages.mmrpt import train_mmrpt  # noqa: E402
from megatron_step.training.checkpoint import RunDirError  # noqa: E402


def main(argv=None) -> dict:
    cfg, _ = cli_run_config("MMRPT masked multimodal RL pretraining (Megatron-Core)", argv, MMRPTRunConfig)
    try:
        out = train_mmrpt(cfg)
    except (RunDirError, FloatingPointError) as e:  # the run directory / too many inf-nan steps
        sys.exit(f"run error: {e}")
    finally:
        platform.teardown()
    if "end" not in out:  # train.exit_after: stopped with a checkpoint before the last step
        print(f"stopped after step {out['exited_at']} (train.exit_after); run dir {cfg.train.run_dir}")
        return out
    a, b = out["start"], out["end"]
    print(
        f"done ({out['objective']}): held-out attribute accuracy {a.get('attribute_accuracy', 0):.3f} -> "
        f"{b.get('attribute_accuracy', 0):.3f}, exact match {a.get('exact_match', 0):.3f} -> "
        f"{b.get('exact_match', 0):.3f}, D(s) ROC-AUC {b.get('d_roc_auc', float('nan')):.3f}; "
        f"skipped samples {out['data']['train'].get('skipped')}; run dir {cfg.train.run_dir}"
    )
    return out


if __name__ == "__main__":  # the dist-checkpoint saver spawns processes: keep this guard
    main()
