"""D(s) after the caption warm-up: ROC-AUC of visual vs generic sentences per decoder-layer set, and how
much the model reads from the image (held-out caption loss with the caption's own image vs another).

    python -m benchmarks.mmrpt_dependency --init-from runs/mmrpt_tiny/warmup
    python -m benchmarks.mmrpt_dependency --init-from /tmp/w300 --set mmrpt.warmup_steps=300

Runs the warm-up first when `--init-from` has no checkpoint (examples/mmrpt/mmrpt_tiny.yaml + --set).
"""

from __future__ import annotations

import argparse
import json

from megatron_step import platform
from megatron_step.config.run import MMRPTRunConfig, load_run_config
from megatron_step.mmrpt.evaluation import caption_loss, dependency_auc
from megatron_step.mmrpt.model import build_vlm, stage_optim, vlm_model_config
from megatron_step.stages.mmrpt import caption_warmup, load_data
from megatron_step.training import checkpoint

CONFIG = "examples/mmrpt/mmrpt_tiny.yaml"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init-from", required=True, help="warm-up run dir (trained first if it has none)")
    ap.add_argument("--set", action="append", default=[], help="config override (repeat)")
    args = ap.parse_args(argv)
    cfg = load_run_config(CONFIG, [*args.set, f"mmrpt.init_from={args.init_from}"], MMRPTRunConfig)
    m = cfg.mmrpt
    platform.setup(cfg.parallel, seed=cfg.train.seed)
    try:
        data = load_data(cfg)
        if checkpoint.latest_step(args.init_from) is None:
            print(json.dumps({"warm-up": caption_warmup(cfg, data, args.init_from)}))
            platform.setup(cfg.parallel, seed=cfg.train.seed)
        lm = cfg.model_config()
        model_cfg = vlm_model_config(lm, data.codec.tok)
        optim = stage_optim(cfg.optim, 1e-4, 1e-4, 1)  # evaluation only: the optimizer never steps
        chunks, _, _ = build_vlm(model_cfg, m.vision, cfg.parallel, optim, 1, data.codec.image_id)
        step = checkpoint.load_model_weights(args.init_from, chunks)
        model = chunks[0].module
        full = [i for i in range(lm.num_layers) if lm.is_full_attention(i)]
        sets = {
            "default (mmrpt.dependency_layers)": data.layers,
            "all full-attention layers": full,
            "all layers": list(range(lm.num_layers)),
            **{f"layer {i}": [i] for i in full},
        }
        out = {
            "init_from": args.init_from,
            "warm-up steps": step,
            **caption_loss(model, data.codec, data.heldout),
        }
        out["D(s) by layers"] = {
            f"{name} {ls}": dependency_auc(model, data.codec, data.heldout, ls) for name, ls in sets.items()
        }
    finally:
        platform.teardown()
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
