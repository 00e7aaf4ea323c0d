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
mmrpt.vision.<field>, mmrpt.loss.<field>). The loop: megatron_step/mmrpt/loop.py.
"""

from __future__ import annotations

import os
import sys
import warnings

warnings.filterwarnings("ignore", message=".*not installed.*")  # TE/apex absent on CPU: expected
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_step.config.run import cli_run_config  # noqa: E402


def main(argv=None) -> dict:
    cfg = cli_run_config(
        "MMRPT masked multimodal RL pretraining (Megatron-Core)",
        argv,
        "run YAML (model_preset + sections incl. mmrpt)",
    )
    from megatron_step import platform
    from megatron_step.mmrpt.loop import train_mmrpt

    try:
        out = train_mmrpt(cfg)
    finally:
        platform.teardown()
    a, b = out["start"], out["end"]
    print(
        f"done ({out['objective']}): held-out attribute accuracy {a.get('attribute accuracy', 0):.3f} -> "
        f"{b.get('attribute accuracy', 0):.3f}, exact match {a.get('exact match', 0):.3f} -> "
        f"{b.get('exact match', 0):.3f}, D(s) ROC-AUC {b.get('D roc_auc', float('nan')):.3f}; "
        f"skipped samples {out['data']['train'].get('skipped')}; run dir {cfg.train.run_dir}"
    )
    return out


if __name__ == "__main__":  # the dist-checkpoint saver spawns processes: keep this guard
    main()
