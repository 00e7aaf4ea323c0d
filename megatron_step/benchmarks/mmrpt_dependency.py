"""D(s) after the caption warm-up: ROC-AUC of visual vs generic sentences per decoder-layer set, and how
much the model reads from the image (held-out caption loss with the caption's own image vs another).

    python -m megatron_step.benchmarks.mmrpt_dependency --init-from runs/mmrpt_tiny/warmup
    python -m megatron_step.benchmarks.mmrpt_dependency --init-from /tmp/w300 --set mmrpt.warmup_steps=300

Runs the warm-up first when `--init-from` has no checkpoint (examples/mmrpt/mmrpt_tiny.yaml + --set).
"""

from __future__ import annotations

import argparse
import json

CONFIG = "examples/mmrpt/mmrpt_tiny.yaml"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init-from", required=True, help="warm-up run dir (trained first if it has none)")
    ap.add_argument("--set", action="append", default=[], help="config override (repeat)")
    args = ap.parse_args(argv)

    from megatron_step import platform
    from megatron_step.config.run import load_run_config
    from megatron_step.mmrpt import loop
    from megatron_step.mmrpt.data import caption_tokenizer, ensure_scene_shards, read_samples
    from megatron_step.mmrpt.dependency import default_dependency_layers
    from megatron_step.mmrpt.text import CaptionCodec
    from megatron_step.training import checkpoint

    cfg = load_run_config(CONFIG, [*args.set, f"mmrpt.init_from={args.init_from}"])
    m = cfg.mmrpt
    platform.setup(cfg.parallel, seed=cfg.train.seed)
    try:
        train, _ = read_samples(m.shards or ensure_scene_shards(m, heldout=False), m)
        heldout, _ = read_samples(m.heldout_shards or ensure_scene_shards(m, heldout=True), m)
        codec = CaptionCodec(caption_tokenizer(m, train), m.vision.num_image_tokens, m.response_format)
        if checkpoint.latest_step(args.init_from) is None:
            print(json.dumps({"warm-up": loop.caption_warmup(cfg, codec, train, args.init_from)}))
            platform.setup(cfg.parallel, seed=cfg.train.seed)
        chunks, _, _ = loop.build_vlm(loop.vlm_run_config(cfg, codec.tok, 1e-4, 1e-4, 1), codec)
        step = checkpoint.load_model_weights(args.init_from, chunks)
        model = chunks[0].module
        lm = cfg.model_config()
        full = [i for i in range(lm.num_layers) if lm.is_full_attention(i)]
        sets = {
            "default (full layers, upper middle)": default_dependency_layers(lm),
            "all full-attention layers": full,
            "all layers": list(range(lm.num_layers)),
            **{f"layer {i}": [i] for i in full},
        }
        out = {"init_from": args.init_from, "warm-up steps": step, **loop.caption_loss(model, codec, heldout)}
        out["D(s) by layers"] = {
            f"{name} {ls}": loop.dependency_auc(model, codec, heldout, ls) for name, ls in sets.items()
        }
    finally:
        platform.teardown()
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
