"""Convert Step 3.5 Flash checkpoints between Megatron-Core dist-checkpoints and Hugging Face.

    # a training checkpoint (any TP/EP/PP layout) -> HF directory, published hub key format, bf16
    python tools/convert_checkpoint.py mcore2hf --ckpt runs/tiny/checkpoints/iter_0000300 \\
        --out runs/tiny/hf --config examples/tiny/tiny.yaml
    # ... or in the dialect transformers' Step3p7TextModel.from_pretrained reads directly, fp32
    python tools/convert_checkpoint.py mcore2hf --ckpt C --out D --config Y --dialect native --dtype fp32
    # with the tokenizer (sentencepiece .model or HF directory) and the chat template, for
    # AutoTokenizer / apply_chat_template: tokenizer.json, tokenizer_config.json, generation_config.json
    python tools/convert_checkpoint.py mcore2hf --ckpt C --out D --config Y \\
        --tokenizer-model runs/data/tokenizer_v2048.model [--chat-template my.jinja]
    # HF directory (hub or transformers-native dialect) -> TP=1 dist-checkpoint; Megatron-Core's
    # dist-checkpointing loads it into any TP/EP/PP layout
    python tools/convert_checkpoint.py hf2mcore --hf runs/tiny/hf --out runs/from_hf [--config ...]

The model shape comes from a run YAML (`--config`, plus `section.field=value` overrides) or a
preset (`--preset`); for hf2mcore it defaults to the directory's config.json, and a given one must
agree with it (the first differing field is named).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore", message=".*not installed.*")

import torch  # noqa: E402

from megatron_step import platform  # noqa: E402
from megatron_step.config.run import load_model_config  # noqa: E402
from megatron_step.convert.hf_checkpoint import export_to_hf, import_from_hf  # noqa: E402
from megatron_step.models.step_flash import preset  # noqa: E402
from megatron_step.platform import ParallelConfig  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _model_config(args):
    if args.config:
        return load_model_config(args.config, args.overrides)
    if args.preset:
        return preset(args.preset)
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("mcore2hf", help="Megatron dist-checkpoint -> HF directory")
    ex.add_argument("--ckpt", required=True, help="dist-checkpoint directory (e.g. .../iter_0000300)")
    ex.add_argument("--out", required=True)
    ex.add_argument("--dialect", choices=["hub", "native"], default="hub")
    ex.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ex.add_argument(
        "--tokenizer-model",
        help="the run's tokenizer (sentencepiece .model or HF tokenizer dir), written as tokenizer.json",
    )
    ex.add_argument(
        "--chat-template",
        help="Jinja file the run's chat data used (default: the tokenizer's own, else the embedded ChatML)",
    )
    im = sub.add_parser("hf2mcore", help="HF directory -> TP=1 Megatron dist-checkpoint")
    im.add_argument("--hf", required=True)
    im.add_argument("--out", required=True)
    im.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    for p in (ex, im):
        p.add_argument("--config", help="run YAML naming the model preset")
        p.add_argument("--preset", help="model preset name (instead of --config)")
        p.add_argument("overrides", nargs="*", help="section.field=value for --config")
    args = ap.parse_args(argv)

    platform.setup(ParallelConfig(), seed=0)  # 1 rank: dist-checkpointing needs a process group
    try:
        cfg = _model_config(args)
        if args.cmd == "mcore2hf":
            if cfg is None:
                sys.exit("mcore2hf needs --config or --preset (the checkpoint does not store the shape)")
            if not os.path.isdir(args.ckpt):
                sys.exit(f"--ckpt {args.ckpt}: not a directory")
            index = export_to_hf(
                args.ckpt, args.out, cfg, DTYPES[args.dtype], args.tokenizer_model, dialect=args.dialect,
                chat_template=args.chat_template,
            )  # fmt: skip
            print(
                f"wrote {len(index['weight_map'])} tensors, {index['metadata']['total_size'] / 1e6:.1f} MB "
                f"({args.dialect} dialect, {args.dtype}) to {args.out}"
            )
        else:
            info = import_from_hf(args.hf, args.out, cfg, DTYPES[args.dtype])
            print(
                f"wrote {info['tensors']} tensors ({info['dialect']} dialect) as a TP=1 dist-checkpoint "
                f"to {args.out}"
            )
    except (ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    finally:
        platform.teardown()


if __name__ == "__main__":  # dist-checkpointing spawns helper processes: keep this guard
    main()
