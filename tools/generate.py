"""Generate completions from a checkpoint: a Megatron run directory or a Hugging Face directory.

    python tools/generate.py --config examples/sft/sft_tiny.yaml --checkpoint runs/sft_tiny \\
        --chat --prompt $'Q: What is 2 + 3?\\nA:' --stream
    python tools/generate.py --config examples/sft/sft_tiny.yaml --checkpoint runs/sft_tiny_hf \\
        --messages '[{"role": "user", "content": "Q: What is 4 * 2?\\nA:"}]'
    python tools/generate.py --config examples/rl/rl_tiny.yaml --checkpoint runs/rl_tiny \\
        --file prompts.jsonl --n 4 --temperature 1.0 --out completions.jsonl

`--checkpoint`: a run directory (its newest checkpoint; model and layout from the run config: the
YAML the run trained with, SFT's or RL's, plus `model.*` / `parallel.*` overrides) or a Hugging Face directory
(tools/convert_checkpoint.py mcore2hf; its config.json and, when present, its tokenizer). A prompt is
text (`--prompt`, repeatable; `--chat` renders it as one user turn of the chat template), chat
messages (`--messages` JSON), or a JSONL file (`--file`: per line "prompt" as text or messages, or
"messages"). Chat prompts stop at the end-of-turn token (`rl.data.stop`, <|im_end|>) as at eos.
Greedy by default; `--temperature T` (> 0) samples, with `--top-p`, `--top-k`, `--seed`; `--n`
samples per prompt. `--stream` prints the text as it is decoded. `--out` writes one JSON record per
completion (prompt index, sample, text, token ids, finish reason).
Library side: megatron_step/stages/generate.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import yaml

warnings.filterwarnings("ignore", message=".*not installed.*")

from megatron_step import platform  # noqa: E402
from megatron_step.config.run import RLRunConfig, SFTRunConfig, cli_run_config  # noqa: E402
from megatron_step.data.chat import ChatError  # noqa: E402
from megatron_step.data.records import iter_records  # noqa: E402
from megatron_step.data.tokenizer import TokenizerError  # noqa: E402
from megatron_step.rl.dataset import RLDataConfig  # noqa: E402
from megatron_step.rl.engine import SamplingParams  # noqa: E402
from megatron_step.stages.generate import complete, load_policy  # noqa: E402
from megatron_step.training.monitor import is_logging_rank  # noqa: E402


def _args(ap) -> None:
    ap.add_argument(
        "--checkpoint", required=True, help="a run directory with checkpoints/, or an HF directory"
    )
    ap.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    ap.add_argument("--messages", help='chat messages as JSON: [{"role": "user", "content": "..."}]')
    ap.add_argument(
        "--file", help='JSONL/Parquet prompts: {"prompt": text | messages} or {"messages": [...]}'
    )
    ap.add_argument("--chat", action="store_true", help="render text prompts with the chat template")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: rl.max_new_tokens (64)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (default train.seed)")
    ap.add_argument("--n", type=int, default=1, help="completions per prompt")
    ap.add_argument("--stream", action="store_true", help="print each completion as it is decoded")
    ap.add_argument("--out", help="write the completions here as JSONL")


def read_prompts(args) -> list:
    """The prompts of the command line, in order: --prompt texts, --messages, then --file lines."""
    prompts = list(args.prompt)
    if args.messages:
        try:
            prompts.append(json.loads(args.messages))
        except json.JSONDecodeError as e:
            raise ChatError(f"--messages: not JSON ({e.msg} at column {e.colno})") from None
    if args.file:
        if not os.path.isfile(args.file):
            raise ChatError(f"--file {args.file}: no such file")
        for where, record in iter_records(args.file):  # JSONL lines or Parquet rows
            if isinstance(record, ChatError):
                raise ChatError(f"{where}: {record}")
            value = record.get("prompt", record.get("messages")) if isinstance(record, dict) else None
            if not (isinstance(value, str) and value) and not isinstance(value, list):
                raise ChatError(f"{where}: no 'prompt' (text or messages) nor 'messages'")
            prompts.append(value)
    if not prompts:
        raise ChatError("no prompt: give --prompt, --messages or --file")
    return prompts


def _config_class(argv):
    """SFTRunConfig for an SFT run's YAML (it has an `sft:` section), else RLRunConfig: the YAML a run
    trained with is the one to give."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config and os.path.isfile(known.config):
        with open(known.config) as f:
            raw = yaml.safe_load(f)
        if isinstance(raw, dict) and "sft" in raw:
            return SFTRunConfig
    return RLRunConfig


def _chat_settings(cfg) -> tuple[str | None, str, int]:
    """(chat template file, end-of-turn text, default max new tokens) of the run config."""
    if isinstance(cfg, SFTRunConfig):
        return cfg.sft.chat_template, RLDataConfig.stop, 64
    return cfg.rl.data.chat_template, cfg.rl.data.stop, cfg.rl.max_new_tokens


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    cls = _config_class(argv)
    cfg, args = cli_run_config("Generate completions from a checkpoint", argv, cls, _args)
    template, stop_text, max_new = _chat_settings(cfg)
    platform.setup(cfg.parallel, seed=cfg.train.seed)
    show = is_logging_rank()
    try:
        if args.n < 1 or args.temperature < 0:
            raise ValueError(f"--n={args.n} must be >= 1 and --temperature={args.temperature} >= 0")
        prompts = read_prompts(args)
        policy = load_policy(cfg, args.checkpoint)
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens or max_new,
            greedy=args.temperature == 0,
            temperature=args.temperature or 1.0,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=cfg.train.seed if args.seed is None else args.seed,
        )
        if show:
            print(f"# {policy.source}", file=sys.stderr)

        current = [None]

        def stream(job, piece):
            if show:
                if job != current[0]:
                    print(("\n" if current[0] else "") + f"# [{job[0]}.{job[1]}]", flush=True)
                    current[0] = job
                print(piece, end="", flush=True)

        outs = complete(
            policy, prompts, params, chat=args.chat, chat_template=template, stop_text=stop_text, n=args.n,
            on_text=stream if args.stream else None,
        )  # fmt: skip
        if show:
            if args.stream:
                print()
            for o in outs:
                print(f"# [{o['prompt']}.{o['sample']}] {o['finish']}, {len(o['ids'])} tokens")
                if not args.stream:
                    print(o["text"])
            if args.out:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w", encoding="utf-8") as f:
                    for o in outs:
                        f.write(json.dumps(o, ensure_ascii=False) + "\n")
    except (ChatError, TokenizerError) as e:
        sys.exit(f"data error: {e}")
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    finally:
        platform.teardown()
    return outs


if __name__ == "__main__":  # the dist-checkpoint loader may spawn processes: keep this guard
    main()
