"""The `rl:` section of a run config (posttrain/train_rl.py). The model, parallel layout, optimizer
(`optim:`) and run bookkeeping (`train:` steps, micro_batch_size, seed, run_dir, log/eval/save
intervals) come from the shared sections; this one holds what is specific to RL.

Defaults are for the embedded arithmetic task on the tiny preset, sized to finish in minutes on a
2-core CPU. The MIS-PO bounds are the Step 3.5 report's; the others are ours (reasons inline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_step.rl.critic import CriticConfig
from megatron_step.rl.dataset import RLDataConfig
from megatron_step.rl.erl import ERLConfig
from megatron_step.rl.lookup import LookupConfig
from megatron_step.rl.losses import PolicyLossConfig
from megatron_step.rl.sandbox import SandboxConfig


@dataclass
class SpeculativeConfig:
    """MTP speculative decoding of the rollouts (`rl.speculative.<field>`; megatron_step/rl/engine.py).
    Greedy decoding (held-out evaluation) is token-identical to plain decoding either way."""

    tokens: int = 0  # drafts per step (<= the model's MTP depths; 0: plain decoding)
    # "rejection": the standard rule (accept with min(1, p/q), resample the residual), exact in
    # distribution; a row's tokens then depend on the batch it shares, so DP layouts sample different
    # (equally distributed) rollouts. "coupled": the draft and the policy share plain decoding's
    # uniform, accepted when they agree: plain decoding's tokens exactly, in every layout, with a lower
    # acceptance rate
    accept: str = "rejection"
    # draft with the policy's own MTP heads (True: every update is a drafter refresh). False drafts with
    # a frozen copy of the starting heads -- a rollout engine whose drafter is never re-synced, to
    # measure what that costs (docs/benchmarks.md); not for training runs
    refresh_drafter: bool = True
    # each MTP depth drafts over its own KV cache of the sequence, as the heads were trained (ours);
    # False: every depth on its single position, Megatron-Core's `compute_mtp_single_step` (what its
    # dynamic engine does; cheaper per draft, far lower acceptance: docs/benchmarks.md)
    mtp_cache: bool = True

    def __post_init__(self):
        if self.tokens < 0:
            raise ValueError(f"rl.speculative.tokens={self.tokens}: must be >= 0 (0: off)")
        if self.accept not in ("rejection", "coupled"):
            raise ValueError(f"rl.speculative.accept={self.accept!r}: one of rejection, coupled")


@dataclass
class E3RLConfig:
    """E3RL knobs. The paper (docs/design.md §5.3) publishes the structure (segments, smoothed mean + max +
    rate of change, group-adaptive threshold, exponential erasure penalty, Erase@K with K=5 best,
    16 x 512-token segments at full scale) but not the weights; those defaults are ours, reasons
    inline. The defaults for segment_len/num_segments fit the tiny CPU arithmetic task."""

    segment_len: int = 8  # S tokens per segment (paper: 512 at full scale)
    num_segments: int = 5  # N segments: S * N must equal rl.max_new_tokens (40 by default; paper: 16)
    max_erasures: int = 5  # K: Erase@K (paper's best K)
    # token uncertainty: "cross_entropy" (-log p of the sampled token, the paper's signal) or
    # "entropy" (of the whole sampling distribution)
    signal: str = "cross_entropy"
    smooth_window: int = 4  # sliding window of the smoothed mean (tokens); ours: half a tiny segment
    # U_n = w_mean * mean(smoothed) + w_max * max + w_rate * max(0, mean_n - mean_{n-1}); ours: the
    # mean carries the level, the max a single derailing token (a quarter weight: one token alone
    # should rarely erase a segment), the rise a jump against the previous kept segment
    w_mean: float = 1.0
    w_max: float = 0.25
    w_rate: float = 0.5
    # Theta_n = (mu_g + threshold_std * sigma_g) * (1 + penalty_growth) ** erasures * history
    # mu_g, sigma_g: U_n over the group's rollouts that reached segment n (first pass). 1 std: erase
    # about the top sixth of segments when U is roughly normal; growth 0.5: the 5th erasure needs a
    # U 7.6x the first one's threshold, so K is rarely reached on noise alone
    threshold_std: float = 1.0
    penalty_growth: float = 0.5
    # history = (mean U of this rollout's kept segments / the group's mean of the same) ** history_power
    # (1 at n = 0): a rollout uncertain all along gets a higher bar, so erasures go to local spikes
    # rather than to hard prompts; ours
    history_power: float = 0.5
    # segment-level advantages (see `segment_advantages`): "uniform" (every kept token gets the
    # sequence advantage: plain GRPO credit) or "attention" (scaled by the attention share each segment
    # gets from the final segment)
    advantage_rule: str = "uniform"

    def __post_init__(self):
        for name in ("segment_len", "num_segments", "smooth_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.e3rl.{name}={getattr(self, name)}: must be >= 1")
        if self.max_erasures < 0:
            raise ValueError(f"rl.e3rl.max_erasures={self.max_erasures}: must be >= 0")
        if self.signal not in ("cross_entropy", "entropy"):
            raise ValueError(f"rl.e3rl.signal={self.signal!r}: one of cross_entropy, entropy")
        if self.advantage_rule not in ("uniform", "attention"):
            raise ValueError(f"rl.e3rl.advantage_rule={self.advantage_rule!r}: one of uniform, attention")
        if self.penalty_growth < 0:
            raise ValueError(f"rl.e3rl.penalty_growth={self.penalty_growth}: must be >= 0")

    @property
    def max_new_tokens(self) -> int:
        return self.segment_len * self.num_segments


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
    # "arithmetic" (the embedded generated task, shaped by task_*) or "package.module:callable" taking
    # this RLConfig and returning a rl.tasks.Task (train / held-out problems, prompt, reference, grading)
    task: str = "arithmetic"
    task_min_steps: int = 1
    task_max_steps: int = 2
    task_max_operand: int = 5  # the tiny model learns operands <= 5 well enough for RL to climb
    # "lookup": multi-hop questions answered through a search tool (megatron_step.rl.lookup); its
    # rollouts are tool rollouts (rl.rollout plain: no rollback, erl: step-level rollbacks)
    lookup: LookupConfig = field(default_factory=LookupConfig)  # override as rl.lookup.<field>=value
    # "dataset": problems from the user's JSONL files, each scored by the reward its data_source names
    # (megatron_step.rl.dataset; the files and keys: rl.data.<field>=value)
    data: RLDataConfig = field(default_factory=RLDataConfig)
    eval_problems: int = 128  # held-out split, greedy decoding
    # + this many sampled responses per held-out problem at the rollout temperature (0: greedy only):
    # the sampled accuracy is what RL optimises, and 4 x 128 samples halve the noise of 128 greedy
    eval_samples: int = 4
    # --- rollouts ----------------------------------------------------------------------------------------
    prompts_per_step: int = 8
    group_size: int = 8  # G rollouts per prompt (GRPO groups)
    max_new_tokens: int = 40
    temperature: float = 1.0  # 1.0: the sampler's pi is the trainer's pi (see rl/engine.py)
    top_p: float = 1.0
    top_k: int = 0
    routing_replay: bool = True  # R3: training forwards replay the rollout's experts (MoE)
    # Sigma_k, the activated experts' score mass per token, logged per MoE layer for the rollouts and
    # the training forward (routing/*): "share" (of all experts' scores), "sum" or "off"
    # (megatron_step.rl.routing_confidence)
    routing_confidence: str = "share"
    # --- loss: the nested rl.loss section (PolicyLossConfig: kind, clip_eps, clip_eps_high, kl_coef,
    # tis_cap, mispo_* bounds, token_level_mean); `rl.loss=grpo` alone sets its kind ------------------
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    # --- MTP ----------------------------------------------------------------------------------------
    # loss weight of each MTP depth on the policy's own sampled responses (the response tokens, as
    # the policy loss), so the draft heads keep up with the policy (the report: MTP loss weight 0.1 in
    # SFT, 0.3 then 0.1 in training); 0: the heads get no gradient and the MTP block is not run
    mtp_loss_weight: float = 0.0
    # MTP speculative decoding of the rollouts: the nested rl.speculative section (SpeculativeConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    # optimizer steps per RL step: the step's rollouts split into this many minibatches (rollout j of
    # group i in (group id x G + j) mod k), each one step of the policy loss, pi_old fixed before the
    # first (the report: 4 actor / 12 critic minibatches; ours 1: the demo's 64 rollouts a step are
    # few, and one step keeps the sync update on-policy)
    actor_minibatches: int = 1
    # --- advantages -----------------------------------------------------------------------------------
    # "grpo": group z-scores of the rewards (no critic); "gae": actor-critic, a critic model (the
    # nested rl.critic section, megatron_step.rl.critic) and GAE per token with truncation-aware
    # bootstrapping. gamma / lam: GAE's discount and trace decay (the report's actor-critic: 1 and 1)
    advantage: str = "grpo"
    gamma: float = 1.0
    lam: float = 1.0
    critic: CriticConfig = field(default_factory=CriticConfig)  # override as rl.critic.<field>=value
    # --- rewards (megatron_step.rl.rewards) -------------------------------------------------------------
    # "package.module:callable" -- a RewardFn (prompt, response, reference) -> float, see
    # megatron_step/rl/rewards.py; "code": the sandboxed code-execution reward (megatron_step.rl.
    # code_reward, its limits in rl.code); None: math correctness (weight 1) + format (reward_format_weight)
    reward_fn: str | None = None
    code: SandboxConfig = field(default_factory=SandboxConfig)  # override as rl.code.<field>=value
    reward_format_weight: float = 0.1
    reward_timeout_s: float = 10.0
    reward_workers: int = 1
    # preference signal (megatron_step.rl.reward_model; train it with tools/train_reward_model.py):
    # reward = verifiable + preference_weight * (win rate vs the reference solution - length penalty)
    reward_model: str | None = None
    preference_weight: float = 0.5
    length_penalty: float = 0.1
    # --- erasable rollouts (megatron_step.rl.erasable, megatron_step.rl.erl) ------------------------
    # plain | e3rl (segment erasure, tasks without a tool) | erl (step-level rollbacks of tool rollouts,
    # a task with a tool: rl.task=lookup)
    rollout: str = "plain"
    e3rl: E3RLConfig = field(default_factory=E3RLConfig)  # override as rl.e3rl.<field>=value
    erl: ERLConfig = field(default_factory=ERLConfig)  # override as rl.erl.<field>=value
    # stop once this rank has sampled this many tokens (erased and rolled-back ones included, a tool's
    # teacher-forced results not; 0: run train.steps): compares rollout schemes at an equal sampling budget
    max_tokens_sampled: int = 0
    # --- off-policy ---------------------------------------------------------------------------------------
    async_mode: bool = False  # generate ahead (on a synced inference replica) while the trainer updates
    max_staleness: int = 1  # rollouts at most this many policy versions behind are trained on
    # async: how many policy versions the generator may run ahead of the trainer (None: max_staleness,
    # nothing goes stale); larger than max_staleness, the surplus goes stale and is dropped (counted
    # in rl/dropped_groups): fresher data for generation that may be wasted
    max_ahead: int | None = None
    # async: the generator runs exactly max_ahead versions ahead and the trainer waits for it, so
    # every step's staleness is fixed and the run does not depend on thread timing (reruns give the
    # same numbers): for comparisons at a set staleness. Needs max_ahead <= max_staleness
    exact_staleness: bool = False

    def __post_init__(self):
        for name in ("prompts_per_step", "group_size", "max_new_tokens", "eval_problems", "reward_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name}={getattr(self, name)}: must be >= 1")
        if self.group_size < 2:
            raise ValueError(
                f"rl.group_size={self.group_size}: group advantages need >= 2 rollouts per prompt"
            )
        if self.eval_samples < 0:
            raise ValueError(f"rl.eval_samples={self.eval_samples}: must be >= 0 (0: greedy evaluation only)")
        if self.max_staleness < 0:
            raise ValueError(f"rl.max_staleness={self.max_staleness}: must be >= 0")
        if self.max_ahead is not None and self.max_ahead < 0:
            raise ValueError(f"rl.max_ahead={self.max_ahead}: must be >= 0 (or null: rl.max_staleness)")
        if self.exact_staleness and (self.max_ahead or 0) > self.max_staleness:
            raise ValueError(
                f"rl.exact_staleness=true with rl.max_ahead={self.max_ahead} > rl.max_staleness="
                f"{self.max_staleness}: every batch would be dropped as stale while the trainer waits for it"
            )
        if (self.task == "dataset") != bool(self.data.train):
            raise ValueError(
                f"rl.task={self.task!r} with rl.data.train={self.data.train}: problem files go with "
                "rl.task=dataset, and rl.task=dataset needs them (rl.data.train=[file.jsonl, ...])"
            )
        if self.rollout not in ("plain", "e3rl", "erl"):
            raise ValueError(f"rl.rollout={self.rollout!r}: one of plain, e3rl, erl")
        if self.rollout == "erl" and self.task == "arithmetic":
            raise ValueError(
                f"rl.rollout=erl with rl.task={self.task!r}: ERL rolls back tool-calling steps; it needs "
                "a task with a tool (rl.task=lookup, or a task of yours with `tool()`)"
            )
        if self.rollout == "e3rl" and self.e3rl.max_new_tokens != self.max_new_tokens:
            raise ValueError(
                f"rl.rollout=e3rl: rl.e3rl.segment_len({self.e3rl.segment_len}) * rl.e3rl.num_segments"
                f"({self.e3rl.num_segments}) = {self.e3rl.max_new_tokens} must equal rl.max_new_tokens"
                f"({self.max_new_tokens}) (the held-out evaluation and plain rollouts use max_new_tokens)"
            )
        if self.actor_minibatches < 1:
            raise ValueError(f"rl.actor_minibatches={self.actor_minibatches}: must be >= 1")
        if not self.mtp_loss_weight >= 0:
            raise ValueError(f"rl.mtp_loss_weight={self.mtp_loss_weight}: must be >= 0")
        if self.routing_confidence not in ("share", "sum", "off"):
            raise ValueError(f"rl.routing_confidence={self.routing_confidence!r}: one of share, sum, off")
        if self.advantage not in ("grpo", "gae"):
            raise ValueError(f"rl.advantage={self.advantage!r}: one of grpo, gae")
        if not 0.0 < self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"rl.gamma={self.gamma}, rl.lam={self.lam}: need 0 < gamma <= 1, 0 <= lam <= 1")
        if self.task == "lookup" and (self.advantage == "gae" or self.rollout == "e3rl"):
            raise ValueError(
                f"rl.task=lookup with rl.advantage={self.advantage}, rl.rollout={self.rollout}: tool "
                "rollouts train with GRPO (the critic does not skip tool-result tokens yet) and roll back "
                "whole steps (rl.rollout=plain or erl)"
            )
        if self.advantage == "gae" and self.rollout != "plain":
            raise ValueError(
                f"rl.advantage=gae with rl.rollout={self.rollout}: E3RL's segment credit scales GRPO's "
                "sequence advantages; use rl.advantage=grpo with erasable rollouts"
            )
        if self.temperature <= 0:
            raise ValueError(f"rl.temperature={self.temperature}: must be > 0")
        if self.speculative.tokens and self.async_mode:
            raise ValueError(
                f"rl.speculative.tokens={self.speculative.tokens} with rl.async_mode=true: the async "
                "replica has no MTP heads (Megatron-Core's InferenceMode flag is process-wide, see "
                "megatron_step/stages/rl.py); use speculative decoding with synchronous RL"
            )
        if self.speculative.tokens and (self.rollout != "plain" or self.task == "lookup"):
            raise ValueError(
                f"rl.speculative.tokens={self.speculative.tokens} with rl.rollout={self.rollout}: "
                "erasable rollouts decode token by token (tool rollouts too); use rl.rollout=plain on a task "
                "without a tool"
            )


__all__ = [
    "CriticConfig",
    "E3RLConfig",
    "ERLConfig",
    "LookupConfig",
    "PolicyLossConfig",
    "RLConfig",
    "SpeculativeConfig",
]
