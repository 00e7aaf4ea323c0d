"""The `rl:` section of a run config (posttrain/train_rl.py). The model, parallel layout, optimizer
(`optim:`) and run bookkeeping (`train:` steps, micro_batch_size, seed, run_dir, log/eval/save
intervals) come from the shared sections; this one holds what is specific to RL.

Defaults are for the embedded arithmetic task on the tiny preset, sized to finish in minutes on a
2-core CPU. The MIS-PO bounds are the Step 3.5 report's; the others are ours (reasons inline).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RLConfig:
    # --- where the policy starts ---------------------------------------------------------------
    init_from: str | None = None  # run dir holding a checkpoint (pretrain/SFT): model weights only
    # supervised warm-up on the task's worked solutions when init_from has no checkpoint yet, so a
    # tiny model starts RL able to produce the format (0: none)
    sft_steps: int = 400
    sft_lr: float = 3e-3
    sft_global_batch_size: int = 16
    # --- task (megatron_step.rl.tasks) ---------------------------------------------------------------
    task_min_steps: int = 1
    task_max_steps: int = 2
    task_max_operand: int = 9
    eval_problems: int = 128  # held-out split, greedy decoding
    # --- rollouts ----------------------------------------------------------------------------------------
    prompts_per_step: int = 8
    group_size: int = 8  # G rollouts per prompt (GRPO groups)
    max_new_tokens: int = 40
    temperature: float = 1.0  # 1.0: the sampler's pi is the trainer's pi (see rl/engine.py)
    top_p: float = 1.0
    top_k: int = 0
    routing_replay: bool = True  # R3: training forwards replay the rollout's experts (MoE)
    # --- loss (megatron_step.rl.losses.PolicyLossConfig) ----------------------------------------------
    loss: str = "mispo"  # grpo | tis | mispo
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    tis_cap: float = 2.0
    mispo_token_low: float = 0.5
    mispo_token_high: float = 2.0
    mispo_traj_low: float = 0.996
    mispo_traj_high: float = 1.001
    # --- rewards (megatron_step.rl.rewards) -------------------------------------------------------------
    # "package.module:callable" -- a RewardFn (prompt, response, reference) -> float, see
    # megatron_step/rl/rewards.py; None: math correctness (weight 1) + format (reward_format_weight)
    reward_fn: str | None = None
    reward_format_weight: float = 0.1
    reward_timeout_s: float = 10.0
    reward_workers: int = 1
    # preference signal (megatron_step.rl.reward_model; train it with tools/train_reward_model.py):
    # reward = verifiable + preference_weight * (win rate vs the reference solution - length penalty)
    reward_model: str | None = None
    preference_weight: float = 0.5
    length_penalty: float = 0.1
    # --- erasable rollouts (megatron_step.rl.erasable; fields map to E3RLConfig without "e3rl_") ---
    rollout: str = "plain"  # plain | e3rl
    e3rl_segment_len: int = 8  # max_new_tokens = segment_len * num_segments in e3rl mode
    e3rl_num_segments: int = 5
    e3rl_max_erasures: int = 5
    e3rl_signal: str = "cross_entropy"
    e3rl_smooth_window: int = 4
    e3rl_w_mean: float = 1.0
    e3rl_w_max: float = 0.25
    e3rl_w_rate: float = 0.5
    e3rl_threshold_std: float = 1.0
    e3rl_penalty_growth: float = 0.5
    e3rl_history_power: float = 0.5
    e3rl_advantage_rule: str = "uniform"
    # stop once this rank has sampled this many tokens (erased ones included; 0: run train.steps):
    # compares rollout schemes at an equal sampling budget
    max_tokens_sampled: int = 0
    # --- off-policy ---------------------------------------------------------------------------------------
    async_mode: bool = False  # generate step k+1 (on a synced inference replica) while training step k
    max_staleness: int = 1  # rollouts at most this many policy versions behind are trained on

    def __post_init__(self):
        for name in ("prompts_per_step", "group_size", "max_new_tokens", "eval_problems", "reward_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name}={getattr(self, name)}: must be >= 1")
        if self.group_size < 2:
            raise ValueError(
                f"rl.group_size={self.group_size}: group advantages need >= 2 rollouts per prompt"
            )
        if self.max_staleness < 0:
            raise ValueError(f"rl.max_staleness={self.max_staleness}: must be >= 0")
        if self.loss not in ("grpo", "tis", "mispo"):
            raise ValueError(f"rl.loss={self.loss!r}: one of grpo, tis, mispo")
        if self.rollout not in ("plain", "e3rl"):
            raise ValueError(f"rl.rollout={self.rollout!r}: one of plain, e3rl")
        if self.rollout == "e3rl":
            self.e3rl()  # validates the e3rl_ fields
        if self.temperature <= 0:
            raise ValueError(f"rl.temperature={self.temperature}: must be > 0")

    def e3rl(self):
        from megatron_step.rl.erasable import E3RLConfig

        return E3RLConfig(
            **{
                f[len("e3rl_") :]: getattr(self, f)
                for f in self.__dataclass_fields__
                if f.startswith("e3rl_")
            }
        )


__all__ = ["RLConfig"]
