"""Evaluate a checkpoint on a file of problems: avg@k, pass@k and greedy accuracy per data_source.

    python tools/evaluate.py --config examples/rl/rl_tiny.yaml --checkpoint runs/rl_data \\
        --data examples/rl/problems_tiny_eval.jsonl --k 4 rl.data.rewards.mbpp=code model.seq_length=128
    torchrun --nproc-per-node 2 tools/evaluate.py ...          # the problems split over DP ranks

The run config gives the model (preset + `model:`), the layout (`parallel.*`), the tokenizer (`data.*`),
the sampling (`rl.temperature`, `rl.top_p`, `rl.top_k`, `rl.max_new_tokens`, seed `train.seed`), the
problem file's keys and prompt format and the reward per source (`rl.data.*`, `rl.code.*`). The file
is JSONL as for `rl.task=dataset` (posttrain/README.md). Prints a table; `--out` writes it as JSON.
Library side: megatron_step/stages/evaluate.py.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore", message=".*not installed.*")

from megatron_step import platform  # noqa: E402
from megatron_step.config.run import RLRunConfig, cli_run_config  # noqa: E402
from megatron_step.data.chat import ChatError  # noqa: E402
from megatron_step.rl.dataset import RLDataError  # noqa: E402
from megatron_step.stages.evaluate import evaluate, format_table  # noqa: E402
from megatron_step.training.monitor import is_logging_rank  # noqa: E402


def _args(ap) -> None:
    ap.add_argument(
        "--checkpoint",
        required=True,
        help="a run directory with checkpoints/ (its newest), or an HF directory",
    )
    ap.add_argument("--data", nargs="+", required=True, help="JSONL problem files")
    ap.add_argument("--k", type=int, default=4, help="sampled responses per problem (default 4)")
    ap.add_argument("--batch", type=int, default=64, help="responses generated together (default 64)")
    ap.add_argument("--out", help="write the result as JSON here")


def main(argv=None) -> dict:
    cfg, args = cli_run_config(
        "Evaluate a checkpoint on a problem file (avg@k, pass@k)", argv, RLRunConfig, _args
    )
    try:
        out = evaluate(cfg, args.checkpoint, args.data, k=args.k, batch=args.batch)
        if is_logging_rank():
            print(f"{out['checkpoint']}, {out['problems']} problems, k={out['k']}")
            print(format_table(out))
            if args.out:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump(out, f, indent=1)
    except (RLDataError, ChatError) as e:  # a problem file, a line, a field that cannot be used
        sys.exit(f"data error: {e}")
    except (FileNotFoundError, ValueError) as e:  # no checkpoint, a bad --k
        sys.exit(f"error: {e}")
    finally:
        platform.teardown()
    return out


if __name__ == "__main__":  # the dist-checkpoint loader may spawn processes: keep this guard
    main()
