"""Train the Bradley-Terry preference reward model (megatron_step/rl/reward_model.py) from pairwise
data, on the policy's backbone, starting from the RL run's initial checkpoint.

    # pairs for the embedded arithmetic task are generated when --pairs does not exist yet
    python tools/train_reward_model.py --config examples/rl/rl_tiny.yaml --pairs runs/rm/pairs.jsonl \
        --out runs/rm/rm --steps 200
    # then: python posttrain/train_rl.py --config examples/rl/rl_tiny.yaml rl.reward_model=runs/rm/rm
    # (the RL run may use parallel.tp / parallel.ep: the backbone is resharded when it loads)

Pairs file: JSON lines {"prompt", "chosen", "rejected"}; 10% (at least 32) are held out to report
pairwise accuracy before and after training.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import warnings

# Megatron-Core announces missing TE/apex when it is imported; on CPU that is expected.
warnings.filterwarnings("ignore", message=".*not installed.*")

from tqdm import tqdm  # noqa: E402

from megatron_step import platform  # noqa: E402
from megatron_step.config.run import RLRunConfig, load_run_config  # noqa: E402
from megatron_step.data.pipeline import run_tokenizer  # noqa: E402
from megatron_step.models.step_flash import build_step_flash  # noqa: E402
from megatron_step.rl import reward_model as rmod  # noqa: E402
from megatron_step.rl.tasks import arithmetic_problems  # noqa: E402
from megatron_step.training import checkpoint  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="the RL run YAML (model, tokenizer, rl.init_from)")
    ap.add_argument(
        "--pairs", required=True, help="pairs .jsonl (generated for the arithmetic task if absent)"
    )
    ap.add_argument(
        "--out", required=True, help="the reward model's directory (backbone/ checkpoint + head.pt)"
    )
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-pairs", type=int, default=3000, help="pairs to generate when --pairs is absent")
    ap.add_argument("overrides", nargs="*", help="section.field=value")
    args = ap.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides, RLRunConfig)
    except ValueError as e:  # the field, the value and what is wrong; no traceback
        raise SystemExit(f"config error: {e}") from None
    env = platform.setup(cfg.parallel, seed=cfg.train.seed)
    if env.world_size > 1:
        raise SystemExit(
            f"tools/train_reward_model.py trains in one process (got {env.world_size} ranks): run it "
            "with python, not torchrun; the RL run loads the result in its own layout"
        )
    tok = run_tokenizer(cfg.data)
    if not os.path.exists(args.pairs):
        r = cfg.rl
        problems = arithmetic_problems(
            args.n_pairs, cfg.train.seed + 41, min_steps=r.task_min_steps, max_steps=r.task_max_steps,
            max_operand=r.task_max_operand,
        )  # fmt: skip
        os.makedirs(os.path.dirname(os.path.abspath(args.pairs)), exist_ok=True)
        rmod.write_pairs(rmod.arithmetic_pairs(problems, seed=cfg.train.seed), args.pairs)
    pairs = rmod.read_pairs(args.pairs)
    n_eval = max(32, len(pairs) // 10)
    train, held = pairs[n_eval:], pairs[:n_eval]
    mcfg = cfg.model_config()
    backbone = build_step_flash(mcfg, cfg.parallel)
    if cfg.rl.init_from and checkpoint.latest_step(cfg.rl.init_from) is not None:
        step = checkpoint.load_model_weights(cfg.rl.init_from, [types.SimpleNamespace(module=backbone)])
        print(f"backbone: {cfg.rl.init_from} step {step}")
    else:
        print("backbone: random init (no checkpoint under rl.init_from)")
    rm = rmod.RewardModel.from_backbone(backbone, dataclasses.asdict(mcfg))
    before = rmod.pair_accuracy(rm, tok, held)
    bar = tqdm(total=args.steps, desc="reward model")
    losses = rmod.train_bradley_terry(
        rm, tok, train, args.steps, batch=args.batch, lr=args.lr, seed=cfg.train.seed,
        progress=lambda s, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")),
    )  # fmt: skip
    bar.close()
    after = rmod.pair_accuracy(rm, tok, held)
    rm.save(args.out)
    print(
        f"held-out pairwise accuracy {before:.3f} -> {after:.3f} ({len(held)} pairs); "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; saved {args.out}"
    )
    platform.teardown()
    return {"before": before, "after": after, "losses": losses}


if __name__ == "__main__":
    main()
