"""Count parameters and FLOPs of a model preset by instantiating it on the meta device.

    python tools/param_count.py --preset step35_flash
    python tools/param_count.py --preset tiny --seq-length 64

The model is the real one (Megatron-Core modules from the project's layer spec), built with no
memory on `torch.device("meta")` in a 1-rank process group; every number is summed from its
`named_parameters()`.
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch

# Megatron-Core announces missing TE/apex at import time; expected here, not news.
warnings.filterwarnings("ignore", message=".*not installed.*")

from megatron_step import platform  # noqa: E402
from megatron_step.models.param_count import attention_flops_per_token, count_parameters  # noqa: E402
from megatron_step.models.step_flash import PRESETS, build_step_flash, preset  # noqa: E402
from megatron_step.platform import ParallelConfig  # noqa: E402


def _b(n: float) -> str:
    return f"{n / 1e9:9.3f}B" if n >= 1e8 else f"{n / 1e6:9.3f}M"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="step35_flash", choices=sorted(PRESETS))
    ap.add_argument("--seq-length", type=int, default=None, help="for attention FLOPs (default: preset's)")
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    cfg = preset(args.preset)
    seq = args.seq_length or cfg.seq_length
    platform.setup(ParallelConfig(), seed=0)
    with torch.device("meta"):
        model = build_step_flash(cfg, ParallelConfig(), use_te=False, initialize=False)
    r = count_parameters(model, cfg.moe_topk, cfg.num_experts)
    head = r.output_layer  # each MTP module predicts through a copy of the LM head
    mtp_with_head = [m + head for m in r.mtp_modules]

    layers = [
        (cfg.full_attention_heads, None)
        if cfg.is_full_attention(i)
        else (cfg.sliding_attention_heads, cfg.sliding_window)
        for i in range(cfg.num_layers)
    ]
    attn = attention_flops_per_token(layers, cfg.head_dim, seq)
    fwd = 2 * (r.active_no_embedding + r.output_layer) + attn

    rows = [
        ("embedding (input)", r.embedding),
        ("LM head", r.output_layer),
        ("attention (all layers)", r.attention),
        ("dense FFN", r.dense_ffn),
        ("routed experts", r.routed_experts),
        ("shared experts", r.shared_experts),
        ("routers", r.router),
        ("norms", r.norms),
        ("other", r.other),
        ("backbone (decoder, no embedding/head)", r.backbone),
        ("backbone + embedding + head", r.backbone + r.embedding + r.output_layer),
        ("active per token (backbone, no embedding)", r.active_no_embedding),
    ]
    rows += [(f"MTP module {k + 1} (+ its head copy)", n) for k, n in enumerate(mtp_with_head)]
    print(
        f"preset {args.preset}: {cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.moe_topk}, "
        f"counted from {sum(1 for _ in model.parameters())} parameter tensors"
    )
    for name, n in rows:
        print(f"  {name:<44} {_b(n)}")
    print(
        f"  {'forward FLOPs/token @ seq ' + str(seq):<44} {fwd / 1e9:9.3f} GFLOP "
        f"(attention {attn / 1e9:.3f}); training ~3x = {3 * fwd / 1e9:.3f} GFLOP"
    )
    platform.teardown()
    return {"report": r, "mtp_with_head": mtp_with_head, "fwd_flops": fwd}


if __name__ == "__main__":
    main()
