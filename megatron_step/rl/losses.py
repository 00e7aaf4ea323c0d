"""Policy losses for off-policy RL: GRPO (PPO clip), TIS (truncated importance sampling) and MIS-PO.

    cfg = PolicyLossConfig(kind="mispo")
    adv_B = group_advantages(rewards_NG).flatten()      # B = N groups x G samples, group-major
    loss, metrics = policy_loss(logp_BT, old_logp_BT, rollout_logp_BT, adv_B, mask_BT, cfg)
    loss.backward()

Four policies meet in one update. All inputs are per-token log-probabilities of the *sampled* token;
v is the policy version that sampled the rollout, c >= v the trainer's version now (c - v: staleness):

  pi_rollout  the inference engine that sampled the response at version v (the log-probs it recorded
              while sampling): the behaviour policy as the engine computes it;
  pi_old      the trainer's forward with the weights of version v (no grad): the behaviour policy in
              the trainer's numerics. It differs from pi_rollout even at the same weights (other
              kernels, precision, MoE routing);
  pi_prox     the trainer's forward with its current weights (version c), before this update (no
              grad): the "proximal" policy of decoupled PPO. pi_prox = pi_old when c = v (sync RL);
  pi_theta    the trainer's current forward (requires grad); equal to pi_prox in value at the first
              (here: only) optimizer step of an update.

How each kind treats mismatch and staleness (docs/design.md, "Off-policy"):
  grpo   PPO clip on r = pi_theta / pi_old: a stale rollout's ratio starts at pi_prox / pi_old != 1,
         and the clip bounds how far the update moves from the behaviour policy; the train-inference
         mismatch is ignored.
  tis    grpo times the truncated weight w = min(pi_old / pi_rollout, tis_cap): the engine mismatch
         at version v corrected with bounded variance, staleness by the PPO ratio as in grpo.
  mispo  (Step 3.5 Flash) no ratio, no weight: binary masks on x_t = pi_prox / pi_rollout -- the
         report's pi_old is "the trainer's" policy of this update, so x_t carries staleness and
         engine mismatch together -- token t kept when x_t in [0.5, 2], a trajectory when the
         geometric mean of its x_t is in [0.996, 1.001]; kept samples are treated as on-policy.
Every kind reports the mismatch and what the MIS-PO masks would keep, so a GRPO run shows whether it
would need them.

Numerics: everything is computed in fp32. Masked-out positions (padding, prompt, tool output) may hold
-inf or nan log-probs; they are replaced by 0 with `torch.where` before any arithmetic, so they contribute
exactly zero to the loss and to the gradient (multiplying by a 0/1 mask would give 0 * nan = nan).

Reduction: the sum over the kept tokens (or, token_level_mean=False, of the per-sequence means) divided
by `normalizer`, by default this call's count of tokens (sequences). With gradient accumulation or data
parallelism the caller passes the step's global count, scaled to what the schedule and DDP divide by
again (PolicyUpdate does: the mean is then over every token of the step, whatever the micro-batches);
`metrics["tokens"]` is this call's count.

Extension point: a loss kind is a `PerTokenLoss` callable registered in `POLICY_LOSSES` under its name
(`register_policy_loss`); `PolicyLossConfig.kind` selects it.

Shape legend: B sequences (N prompt groups x G samples each), T response positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

F32 = torch.float32


@dataclass
class PolicyLossConfig:
    """`rl.loss` section. Defaults: PPO's clip 0.2; MIS-PO's published bounds (Step 3.5 Flash); the rest
    are our choices where no paper fixes them, documented per field."""

    # grpo | tis | mispo (any name registered in POLICY_LOSSES)
    kind: str = "mispo"
    # PPO ratio clip: r = pi_theta/pi_old is clipped to [1 - clip_eps, 1 + clip_eps_high] (grpo, tis).
    clip_eps: float = 0.2
    # Asymmetric upper clip ("clip-higher", DAPO uses 0.28 so low-probability tokens can still grow);
    # None: symmetric, = clip_eps.
    clip_eps_high: float | None = None
    # Weight of the k3 estimate of KL(pi_theta || pi_ref) added per token. 0: no reference model (as in
    # DAPO and Step 3.5's RL); a positive value needs `ref_logp`.
    kl_coef: float = 0.0
    # TIS: the importance weight pi_old/pi_rollout is truncated at this value. 2.0 is the cap used by Yao
    # et al. ("Your efficient RL framework secretly brings you off-policy RL training", 2025).
    tis_cap: float = 2.0
    # MIS-PO token mask: keep token t when mispo_token_low <= x_t <= mispo_token_high (published: [0.5, 2]).
    mispo_token_low: float = 0.5
    mispo_token_high: float = 2.0
    # MIS-PO trajectory mask: keep a sequence when the geometric mean of its x_t lies in
    # [mispo_traj_low, mispo_traj_high] (published: [0.996, 1.001]; deliberately tight and asymmetric).
    mispo_traj_low: float = 0.996
    mispo_traj_high: float = 1.001
    # True: sum over all response tokens of the batch / their count (DAPO's token-level loss): each token
    # weighs the same, so a 2,000-token answer counts 10x a 200-token one.
    # False: mean over each sequence's tokens, then mean over sequences (the original GRPO objective
    # 1/G sum_i 1/|o_i| sum_t): each sequence weighs the same, so tokens of long answers weigh less
    # (the length bias Dr. GRPO and DAPO point out). Sequences without tokens are left out of the mean.
    token_level_mean: bool = True

    def __post_init__(self):
        if self.kind not in POLICY_LOSSES:
            raise ValueError(f"rl.loss.kind={self.kind!r}: one of {', '.join(POLICY_LOSSES)}")
        if not 0.0 < self.clip_eps < 1.0:
            raise ValueError(f"rl.loss.clip_eps={self.clip_eps}: must be in (0, 1)")
        if self.clip_eps_high is not None and not self.clip_eps_high > 0.0:
            raise ValueError(f"rl.loss.clip_eps_high={self.clip_eps_high}: must be > 0 (or None)")
        if not self.kl_coef >= 0.0:
            raise ValueError(f"rl.loss.kl_coef={self.kl_coef}: must be >= 0")
        if not self.tis_cap > 0.0:
            raise ValueError(f"rl.loss.tis_cap={self.tis_cap}: must be > 0")
        # An interval that excludes 1 would drop every token even with no mismatch at all.
        for name in ("token", "traj"):
            low, high = getattr(self, f"mispo_{name}_low"), getattr(self, f"mispo_{name}_high")
            if not 0.0 < low <= 1.0 <= high < math.inf:
                raise ValueError(
                    f"rl.loss.mispo_{name}_low={low}, rl.loss.mispo_{name}_high={high}: "
                    "need 0 < low <= 1 <= high < inf"
                )

    @property
    def eps_high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high


@dataclass
class LossTerms:
    """What a `PerTokenLoss` sees: fp32 tensors whose masked-out positions are already 0 (finite), so any
    arithmetic on them is safe; `policy_loss` zeroes the masked positions of the result again."""

    logp: Tensor  # (B, T) log pi_theta, carries the gradient
    old_logp: Tensor  # (B, T) log pi_old (the trainer at the sampling version), detached
    rollout_logp: Tensor  # (B, T) log pi_rollout, detached
    log_x: Tensor  # (B, T) log x_t = log pi_prox - rollout_logp (MIS-PO's masks)
    log_w: Tensor  # (B, T) log pi_old - rollout_logp: the engine mismatch at the sampling version (TIS)
    adv: Tensor  # (B, T) advantages, broadcast over T when given per sequence, detached
    keep: Tensor  # (B, T) bool, response tokens that count
    token_keep: Tensor  # (B, T) bool, MIS-PO token mask (within `keep`)
    traj_keep: Tensor  # (B,) bool, MIS-PO trajectory mask (False for a sequence without tokens)
    n_tokens: Tensor  # () fp32, number of tokens in `keep`

    def mean(self, x: Tensor) -> Tensor:
        """Mean of x (B, T) over the kept tokens; 0 when there are none."""
        return torch.where(self.keep, x.to(F32), 0.0).sum() / self.n_tokens.clamp(min=1.0)


# A loss kind: (terms, cfg) -> (per-token loss (B, T), extra metrics as 0-d tensors). Values at masked
# positions are ignored; the loss is minimised.
PerTokenLoss = Callable[[LossTerms, PolicyLossConfig], tuple[Tensor, dict[str, Tensor]]]


def ppo_clip_loss(t: LossTerms, cfg: PolicyLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO/PPO: -min(r A, clip(r, 1 - eps, 1 + eps_high) A) with r = pi_theta / pi_old. Where the clipped
    term is the smaller one the token gets no gradient; `clip_frac` is the share of such tokens."""
    ratio = torch.exp(t.logp - t.old_logp)  # (B, T); 1 at masked positions
    clipped = ratio.clamp(1.0 - cfg.clip_eps, 1.0 + cfg.eps_high)
    obj, obj_clipped = ratio * t.adv, clipped * t.adv  # (B, T)
    per_token = -torch.minimum(obj, obj_clipped)
    # r as the update starts (pi_prox / pi_old in value): 1 on fresh rollouts, not on stale ones
    return per_token, {"clip_frac": t.mean((obj_clipped < obj).to(F32)), "ppo_ratio_mean": t.mean(ratio)}


def tis_loss(t: LossTerms, cfg: PolicyLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss times the truncated importance weight w = min(pi_old / pi_rollout, tis_cap), detached:
    corrects (with bounded variance) for sampling from pi_rollout while the ratio is taken to pi_old."""
    per_token, metrics = ppo_clip_loss(t, cfg)
    # min(x, cap) as exp(min(log x, log cap)): the same value, without overflowing exp for a large log x.
    w = torch.exp(t.log_w.clamp(max=math.log(cfg.tis_cap)))  # (B, T), no grad: built from old/rollout
    metrics["tis_weight_mean"] = t.mean(w)
    metrics["tis_trunc_frac"] = t.mean((t.log_w > math.log(cfg.tis_cap)).to(F32))
    return per_token * w, metrics


def mispo_loss(t: LossTerms, cfg: PolicyLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """MIS-PO: -m_t M logp A. No ratio and no weight: a token either takes the plain policy-gradient step
    or none. A large mismatch cannot blow up the gradient (as an unbounded weight would), and the tokens
    that remain are those where pi_old ~ pi_rollout, for which the on-policy gradient is nearly unbiased;
    the price is the discarded samples (see keep_rate). d loss / d logp_t = -m_t M A_t / count."""
    keep = t.token_keep & t.traj_keep[:, None]  # (B, T)
    return torch.where(keep, -t.logp * t.adv, 0.0), {}


POLICY_LOSSES: dict[str, PerTokenLoss] = {"grpo": ppo_clip_loss, "tis": tis_loss, "mispo": mispo_loss}


def register_policy_loss(name: str, fn: PerTokenLoss) -> None:
    """Make `fn` selectable as `rl.loss.kind=name`. Refuses to replace an existing kind silently."""
    if name in POLICY_LOSSES:
        raise ValueError(f"policy loss {name!r} is already registered")
    POLICY_LOSSES[name] = fn


def group_advantages(
    rewards: Tensor, normalize_std: bool = True, eps: float = 1e-6, valid: Tensor | None = None
) -> Tensor:
    """GRPO advantages: (reward - group mean) / (group std + eps), per row of `rewards` (N_groups, G).

    The std is the *population* std (divide by G, not G - 1): the G samples are the whole group being
    normalised, a group of one gives advantage 0 instead of nan, and the advantages of a group have mean
    0 and mean square ~1. verl and TRL use torch.std's sample std; theirs are ours x sqrt((G - 1) / G)
    (0.968 at G = 16). A group with equal rewards gets advantage 0 (no signal) either way.
    normalize_std=False only centres (Dr. GRPO: the division up-weights near-uniform groups).
    `valid` (N, G) bool: the statistics of each group over its valid entries only (a failed reward
    call has no reward: it must not pull its group's baseline), advantage 0 elsewhere."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (N_groups, G), got shape {tuple(rewards.shape)}")
    r = rewards.to(F32)  # (N, G)
    if valid is not None:
        v = valid.to(F32)
        n = v.sum(dim=1, keepdim=True).clamp_min(1.0)
        centred = (r - (r * v).sum(dim=1, keepdim=True) / n) * v
        if not normalize_std:
            return centred
        return centred / ((centred.square().sum(dim=1, keepdim=True) / n).sqrt() + eps)
    centred = r - r.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centred
    return centred / (r.std(dim=1, correction=0, keepdim=True) + eps)


def _mispo_masks(log_x: Tensor, keep: Tensor, n_tok: Tensor, cfg: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    # Bounds are compared in log space: log x_t is what we have exactly, exp() would round it. Torch
    # casts a python-float operand to the tensor's fp32, so a token whose fp32 log-ratio equals fp32(ln 2)
    # is kept (inclusive), as the paper's closed interval says.
    def within(v: Tensor, low: float, high: float) -> Tensor:
        return (v >= math.log(low)) & (v <= math.log(high))

    token_keep = keep & within(log_x, cfg.mispo_token_low, cfg.mispo_token_high)  # (B, T)
    # Geometric mean of x_t over the sequence's tokens = exp(mean log x_t).
    seq_log_x = log_x.sum(dim=-1) / n_tok.clamp(min=1.0)  # (B,)
    traj_keep = (n_tok > 0) & within(seq_log_x, cfg.mispo_traj_low, cfg.mispo_traj_high)  # (B,)
    return token_keep, traj_keep


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    rollout_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: PolicyLossConfig,
    ref_logp: Tensor | None = None,
    normalizer: float | None = None,
    prox_logp: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The policy loss of `cfg.kind` (+ kl_coef x k3 KL to `ref_logp`), reduced over `mask`: summed
    and divided by `normalizer` (default: this call's token count, or sequence count when
    cfg.token_level_mean is False; see the module docstring for the step-global mean).

    logp (B, T) log pi_theta (grad); old_logp, rollout_logp (B, T) log pi_old, log pi_rollout (no grad);
    advantages (B,) or (B, T); mask (B, T), nonzero for response tokens that count; ref_logp (B, T) or None;
    prox_logp (B, T) log pi_prox, the trainer's current weights (None: = old_logp, the rollouts are
    from the current version). Returns the scalar fp32 loss and python-float metrics (one device sync
    for all of them):

      mismatch_kl      mean of log pi_rollout - log pi_old over the tokens: the k1 estimator of
                       KL(pi_rollout || pi_old) under the rollout's own samples (unbiased, can be < 0);
      mismatch_k3      mean of w - 1 - log w, w = pi_old / pi_rollout: the k3 estimator of the same KL;
      staleness_kl     mean of log pi_old - log pi_prox: k1 of KL(pi_old || pi_prox), how far the
                       trainer moved since the rollouts were sampled (0 when they are fresh);
      ratio_mean/min/max   of x_t = pi_prox / pi_rollout over the tokens (1 when there are none);
      token_mask_rate  share of tokens the MIS-PO token mask keeps; traj_mask_rate: share of sequences
                       (with tokens) the trajectory mask keeps; keep_rate: share of tokens kept by both.
                       Computed for every kind, as diagnostics;
      tokens           number of tokens in the mask;
      clip_frac        (grpo, tis) share of tokens whose ratio clip removed the gradient;
      ppo_ratio_mean   (grpo, tis) mean of r = pi_theta / pi_old as the update starts;
      tis_weight_mean, tis_trunc_frac   (tis) mean weight, share of weights cut at tis_cap;
      kl_ref           (ref_logp given) mean k3 estimate of KL(pi_theta || pi_ref).
    """
    shape = tuple(logp.shape)
    if logp.dim() != 2 or logp.numel() == 0:
        raise ValueError(f"logp must be a non-empty (B, T) tensor, got shape {shape}")
    named = {
        "old_logp": old_logp,
        "rollout_logp": rollout_logp,
        "mask": mask,
        "ref_logp": ref_logp,
        "prox_logp": prox_logp,
    }
    for name, x in named.items():
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, logp has {shape}")
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(f"advantages must be (B,) or (B, T) = {shape}, got {tuple(advantages.shape)}")
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"rl.loss.kl_coef={cfg.kl_coef} needs ref_logp (a reference model's log-probs)")

    keep = mask != 0  # (B, T) bool

    def clean(x: Tensor) -> Tensor:  # fp32, masked positions -> 0 (also cuts their gradient path)
        return torch.where(keep, x.to(F32), 0.0)

    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv[:, None].expand(shape)
    logp_, old_, roll_ = clean(logp), clean(old_logp.detach()), clean(rollout_logp.detach())  # (B, T)
    prox_ = old_ if prox_logp is None else clean(prox_logp.detach())  # (B, T)
    log_w = old_ - roll_  # (B, T) log(pi_old / pi_rollout), 0 at masked positions
    log_x = log_w if prox_logp is None else prox_ - roll_  # (B, T) log(pi_prox / pi_rollout)
    n_tok = keep.to(F32).sum(dim=-1)  # (B,)
    token_keep, traj_keep = _mispo_masks(log_x, keep, n_tok, cfg)
    t = LossTerms(logp_, old_, roll_, log_x, log_w, clean(adv), keep, token_keep, traj_keep, n_tok.sum())

    per_token, extra = POLICY_LOSSES[cfg.kind](t, cfg)  # (B, T)
    if ref_logp is not None:
        d = clean(ref_logp.detach()) - logp_  # (B, T) log(pi_ref / pi_theta)
        k3 = torch.exp(d) - d - 1.0  # >= 0, unbiased for KL(pi_theta || pi_ref) under pi_theta's samples
        extra["kl_ref"] = t.mean(k3.detach())
        if cfg.kl_coef > 0:  # skipped at 0: 0 * inf (an overflowing exp) would be nan
            per_token = per_token + cfg.kl_coef * k3
    per_token = torch.where(keep, per_token, 0.0)  # (B, T)

    if cfg.token_level_mean:
        total, count = per_token.sum(), t.n_tokens
    else:
        total, count = (per_token.sum(dim=-1) / n_tok.clamp(min=1.0)).sum(), (n_tok > 0).sum()  # (B,) -> ()
    loss = total / (count.clamp(min=1) if normalizer is None else max(float(normalizer), 1e-30))

    with torch.no_grad():
        x = torch.exp(log_x)  # (B, T)
        any_tok = t.n_tokens > 0
        n_seq = (n_tok > 0).sum().clamp(min=1)
        metrics = {
            "mismatch_kl": t.mean(-log_w),
            "mismatch_k3": t.mean(torch.exp(log_w) - 1.0 - log_w),
            "staleness_kl": t.mean(old_ - prox_),
            "ratio_mean": torch.where(any_tok, t.mean(x), 1.0),
            "ratio_min": torch.where(any_tok, torch.where(keep, x, math.inf).amin(), 1.0),
            "ratio_max": torch.where(any_tok, torch.where(keep, x, -math.inf).amax(), 1.0),
            "token_mask_rate": t.mean(token_keep.to(F32)),
            "traj_mask_rate": traj_keep.sum() / n_seq,
            "keep_rate": t.mean((token_keep & traj_keep[:, None]).to(F32)),
            "tokens": t.n_tokens,
            **extra,
        }
        values = torch.stack([v.to(F32).reshape(()) for v in metrics.values()]).tolist()
    return loss, dict(zip(metrics, values, strict=True))
