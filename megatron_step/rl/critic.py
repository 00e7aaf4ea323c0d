"""Actor-critic RL (`rl.advantage: gae`): a critic -- the Step model with a scalar value head -- trained
beside the policy, GAE advantages with truncation-aware bootstrapping, and the value loss.

    critic = Critic.build(model_cfg, parallel, optim_cfg, rl.critic, steps, micro_batch_size, policy_dir)
    adv, m = critic.advantages(groups, gamma=1.0, lam=1.0)   # values (no grad) -> GAE, per token
    metrics = policy_update(groups, advantages=adv)            # the actor step
    metrics |= critic.update(groups)                           # value-loss optimizer step(s)

The model: `build_step_flash` (the policy's architecture and parallel layout, no MTP) whose output
layer is replaced by `ValueHead` (hidden -> 1): GPTModel calls its output layer as it would the vocab
projection, so its forward without labels returns values (B, S, 1) on the last pipeline stage and
Megatron-Core's schedules, DDP and distributed optimizer train it like any model (its own optimizer
and LR, `rl.critic.lr`). Initialised from the policy's starting checkpoint (backbone, zero head), from
a reward model (tools/train_reward_model.py: backbone and head) or from a critic checkpoint (saved
with the policy under <run_dir>/critic).

Values and GAE (docs/design.md, "Actor-critic"): a response of T tokens takes actions a_0..a_{T-1};
V_t is the critic's output at the position whose input is the token before a_t (the state a_t is
taken in), V_T the output at the last response token (the state after the response). With the one
reward R on the last action and gamma, lam:

    delta_t = r_t + gamma * V'_{t+1} - V_t
    ended with EOS (terminal):          r_{T-1} = R,  V'_T = 0
    cut at max length (truncated):      r_{T-1} = 0,  V'_T = V_T -- the report's truncation-aware
                                        bootstrapping, R^ = V(s_T) in place of the reward: a cut
                                        response's reward (scored on an unfinished answer) says little
                                        about where it was going
    r_t = 0 and V'_{t+1} = V_{t+1} for t < T-1
    A_t = sum_l (gamma lam)^l delta_{t+l},   returns G_t = A_t + V_t (the critic's targets)

With gamma = lam = 1 (the report's): A_t = R - V_t, or V_T - V_t for a truncated response.
Advantages are whitened over every response token of the step (all DP ranks) when
`rl.critic.whiten_advantages` (off by default).

Value loss per token: 0.5 (V - G)^2, or with `value_clip` c the PPO form
0.5 max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2); a mean over every token of the step
(megatron_step.rl.policy.normalize_step). `minibatches` k > 1 splits the step's groups into k parts
(rollout j of group i in part (i G + j) mod k: the same split in every DP layout) with one
optimizer step each (a part empty on every rank is skipped), all
on the targets computed before the first.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from megatron_step.models.step_flash import StepFlashConfig, build_step_flash
from megatron_step.platform import ParallelConfig
from megatron_step.rl.buffer import Rollout
from megatron_step.rl.policy import Microbatches, normalize_step
from megatron_step.training import checkpoint
from megatron_step.training.setup import build_model_and_optimizer
from megatron_step.training.step import SkipGuard, dp_sum, forward_backward, from_last_stage, train_step

F32 = torch.float32


@dataclass
class CriticConfig:
    """`rl.critic` section (used when rl.advantage=gae)."""

    # "policy": the policy's starting checkpoint (backbone) with a zero value head; or a reward-model
    # directory (tools/train_reward_model.py: backbone/ + head.pt); or a run directory holding a
    # critic checkpoint (<run_dir>/critic of an earlier RL run)
    init_from: str = "policy"
    # the critic's LR; None: 2.5 x optim.lr, the report's critic / actor ratio (5e-6 / 2e-6). The
    # rest of its optimizer (kind, betas, clipping, schedule) is the run's optim section
    lr: float | None = None
    # optimizer steps of the critic per RL step on the step's rollouts (the report: 12 at full scale;
    # ours: 4 -- a zero-initialised head on 64 rollouts per step needs several steps to catch up)
    minibatches: int = 4
    # PPO value clipping: V - V_old clipped to +-value_clip in a second loss term (None: off; the
    # report does not say it uses it)
    value_clip: float | None = None
    # whiten the GAE advantages over the step's tokens (mean 0, std 1), as PPO implementations often
    # do. Off by default (ours, measured): when a step's rewards are all equal the advantages are
    # the critic's small errors, and whitening blows them up to unit scale -- on the tiny task the
    # policy drifted to format-only answers within 8 steps (docs/design.md); unwhitened, they stay
    # the size of the reward's surprise (GRPO gives such a step 0)
    whiten_advantages: bool = False
    # a response cut at rl.max_new_tokens: "bootstrap" (the report's truncation-aware bootstrapping:
    # R^ = V(s_T) in place of its reward) or "terminal" (its reward, as if it had ended there). With a
    # max length the policy can reach easily, bootstrapping lets it escape a wrong answer's negative
    # advantage by not answering (the cut state is valued at about the mean return and never
    # corrected); the report runs at max lengths rarely reached (stable at 20% truncation)
    truncation: str = "bootstrap"

    def __post_init__(self):
        if self.truncation not in ("bootstrap", "terminal"):
            raise ValueError(f"rl.critic.truncation={self.truncation!r}: one of bootstrap, terminal")
        if self.minibatches < 1:
            raise ValueError(f"rl.critic.minibatches={self.minibatches}: must be >= 1")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"rl.critic.lr={self.lr}: must be > 0 (or null: 2.5 x optim.lr)")
        if self.value_clip is not None and not self.value_clip > 0:
            raise ValueError(f"rl.critic.value_clip={self.value_clip}: must be > 0 (or null: off)")


class ValueHead(torch.nn.Module):
    """hidden (S, B, H) -> values (S, B, 1), called by GPTModel in place of its output layer (so it
    takes, and ignores, the output layer's `weight` / `runtime_gather_output` arguments). Replicated
    over TP: under sequence parallelism the hidden states are gathered first, and the backward takes
    this rank's slice back (not a sum over the TP ranks, which all compute the same values)."""

    def __init__(self, hidden_size: int, sequence_parallel: bool, device=None):
        super().__init__()
        # named as GPTModel's output layer's parameters (output_layer.weight / .bias): Megatron-Core's
        # LanguageModule.sharded_state_dict expects those keys on the last stage; no TP axis, so the
        # default sharded state (replicated over TP) is right
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(1, device=device))
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return torch.nn.functional.linear(hidden.float(), self.weight.float(), self.bias.float()), None


def build_critic_model(cfg: StepFlashConfig, parallel: ParallelConfig, vp_stage=None):
    """One (virtual) pipeline chunk of the critic: the Step GPTModel without MTP, its output layer
    (last stage) a `ValueHead`."""
    model = build_step_flash(cfg, parallel, vp_stage=vp_stage)
    if model.post_process:
        dev = next(model.parameters()).device
        model.output_layer = ValueHead(model.config.hidden_size, model.config.sequence_parallel, device=dev)
    return model


def critic_model_config(policy: StepFlashConfig) -> StepFlashConfig:
    """The critic's architecture: the policy's, without MTP heads and without routing replay (its
    routers pick their own experts)."""
    return dataclasses.replace(policy, mtp_num_layers=0, mtp_loss_weights=[], routing_replay=False)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    truncated: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns (both (B, T)) of B responses (module docstring).

    rewards (B,) the reward of each response, on its last token; values (B, T + 1): V_0..V_{T_b} in
    the first T_b + 1 entries of row b (the rest ignored); lengths (B,) T_b >= 1; truncated (B,) bool,
    True: cut at max length, bootstrap from V_{T_b} in place of the reward; False: terminal (EOS).
    Entries t >= T_b of the results are 0."""
    b, t_max = values.shape[0], values.shape[1] - 1
    values, rewards = values.to(F32), rewards.to(F32)
    t_idx = torch.arange(t_max)
    last = lengths[:, None] - 1 == t_idx  # (B, T) the last action
    inside = t_idx < lengths[:, None]  # (B, T)
    v_next = values[:, 1:].clone()  # (B, T): V_{t+1}
    boot = torch.where(truncated, values[torch.arange(b), lengths], 0.0)  # (B,) V'_T
    v_next = torch.where(last, boot[:, None], v_next)
    r = torch.where(last & ~truncated[:, None], rewards[:, None], 0.0)  # a truncated response: no reward
    delta = torch.where(inside, r + gamma * v_next - values[:, :-1], 0.0)  # (B, T)
    adv = torch.zeros(b, t_max)
    run = torch.zeros(b)
    for t in range(t_max - 1, -1, -1):  # A_t = delta_t + gamma lam A_{t+1} (0 past the end)
        run = delta[:, t] + gamma * lam * run * inside[:, t]
        adv[:, t] = run
    adv = torch.where(inside, adv, 0.0)
    returns = torch.where(inside, adv + values[:, :-1], 0.0)
    return adv, returns


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    old_values: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over `mask` of 0.5 (V - G)^2 (clipped form with `clip`, module docstring), divided by
    `normalizer` (default: the mask's token count). All (B, S). Metrics: loss, clip_frac (tokens
    whose clipped term was the larger), value_mean, tokens."""
    keep = mask != 0
    v = torch.where(keep, values.float(), 0.0)
    g = torch.where(keep, returns.float(), 0.0)
    err = (v - g) ** 2
    clipped_frac = torch.zeros(())
    if clip is not None:
        v_old = torch.where(keep, old_values.float(), 0.0)
        v_clip = v_old + (v - v_old).clamp(-clip, clip)
        err_clip = (v_clip - g) ** 2
        clipped_frac = (keep & (err_clip > err)).sum().float()
        err = torch.maximum(err, err_clip)
    n = keep.sum().float()
    loss = 0.5 * torch.where(keep, err, 0.0).sum() / (n.clamp(min=1.0) if normalizer is None else normalizer)
    with torch.no_grad():
        metrics = {
            "value_loss": float(loss),
            "clip_frac": float(clipped_frac / n.clamp(min=1.0)),
            "value_mean": float(v.sum() / n.clamp(min=1.0)),
            "tokens": float(n),
        }
    return loss, metrics


def _values_step(data_iterator, model):
    """forward_step_func of a value pass (forward only): values (B, S) as the loss function's data."""
    batch = next(data_iterator)
    out = model(batch["tokens"], batch["position_ids"], None)

    def loss_func(v_BS1):
        v = v_BS1.squeeze(-1).float()
        return (v * 0.0).sum(), {"values": v.detach()}

    return out, loss_func


def _make_value_step(clip: float | None):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch["tokens"], batch["position_ids"], None)

        def loss_func(v_BS1):
            v = v_BS1.squeeze(-1).float()
            if batch.get("padding"):
                return (v * 0.0).sum(), {}
            loss, m = value_loss(
                v, batch["returns"], batch["old_values"], batch["mask"], clip, batch["loss_normalizer"]
            )
            return loss, {k: torch.tensor(x) for k, x in m.items()}

        return out, loss_func

    return forward_step


def _items(rollouts: list[Rollout]) -> list[dict]:
    """The critic's packed items: the response plus one token (0), so the input covers every
    response token and the output at the last one is V_T; the mask spans V_0..V_T."""
    return [{"prompt_ids": r.prompt_ids, "response_ids": list(r.response_ids) + [0]} for r in rollouts]


class Critic:
    """The critic's chunks, optimizer and schedule, its value pass, GAE and value-loss steps."""

    def __init__(self, chunks, optimizer, scheduler, cfg: CriticConfig, micro_batch_size: int):
        self.chunks, self.optimizer, self.scheduler, self.cfg = chunks, optimizer, scheduler, cfg
        self.batches = Microbatches(chunks, micro_batch_size, replay=False)
        self.forward_step = _make_value_step(cfg.value_clip)
        self._targets: dict[int, tuple[list[float], list[float]]] = {}  # id(rollout) -> (V_old, G)
        self.loaded = ""  # what the weights were loaded from (the run banner)
        self.guard = SkipGuard(3, "the critic update")  # inf/nan steps skipped (Critic.build: the limit)

    @classmethod
    def build(
        cls,
        model_cfg,
        parallel,
        optim,
        cfg: CriticConfig,
        steps: int,
        micro_batch_size: int,
        policy_dir,
        max_skipped: int = 3,
    ):
        """Build in `parallel`'s layout (every rank) and load per `cfg.init_from` (class docstring);
        `policy_dir`: the run directory the policy starts from. `steps`: RL steps (the schedule runs
        over steps x minibatches optimizer steps)."""
        mcfg = critic_model_config(model_cfg)
        lr = cfg.lr or 2.5 * optim.lr
        # the same schedule shape: min_lr scaled as lr (exactly lr for a constant schedule)
        min_lr = lr if optim.min_lr == optim.lr else min(lr, optim.min_lr * lr / optim.lr)
        o = dataclasses.replace(optim, lr=lr, min_lr=min_lr)
        chunks, optimizer, scheduler = build_model_and_optimizer(
            mcfg, parallel, o, steps * cfg.minibatches, build=lambda v: build_critic_model(mcfg, parallel, v)
        )
        critic = cls(chunks, optimizer, scheduler, cfg, micro_batch_size)
        critic.guard.limit = max_skipped
        critic.loaded = load_critic(cfg.init_from, policy_dir, chunks, optimizer)
        return critic

    def _trainable(self, groups: list[list[Rollout]]) -> list[Rollout]:
        return [r for grp in groups for r in grp if not r.reward_failed]

    @torch.no_grad()
    def values(self, rollouts: list[Rollout]) -> list[list[float]]:
        """V_0..V_T of each rollout (T + 1 floats; the last pipeline stage, zeros elsewhere)."""
        items = _items(rollouts)
        micro, _ = self.batches.build(items)
        got = forward_backward(
            self.chunks, micro, forward_step=_values_step, forward_only=True, **self.batches.shape(micro)
        )
        out = []
        mbs = self.batches.mbs
        for k, r in enumerate(rollouts):
            p, t = len(r.prompt_ids), len(r.response_ids)
            if got:
                v = got[k // mbs]["values"][k % mbs, p - 1 : p + t]
                out.append(v.cpu().tolist())
            else:
                out.append([0.0] * (t + 1))
        return out

    def advantages(self, groups: list[list[Rollout]], gamma: float, lam: float):
        """Per-token GAE advantages nested as `groups` (failed rewards: zeros, not trained on), whitened
        over the step when configured, and the targets of the next `update`. Returns (advantages,
        critic/* metrics of the value pass)."""
        train = self._trainable(groups)
        vals = self.values(train)  # every rank, even with nothing to score: EP / TP forwards are collective
        t_max = max([len(r.response_ids) for r in train] + [1])
        v = torch.zeros(len(train), t_max + 1)
        for k, row in enumerate(vals):
            v[k, : len(row)] = torch.tensor(row)
        lengths = torch.tensor([len(r.response_ids) for r in train], dtype=torch.long)
        trunc = torch.tensor([r.truncated for r in train], dtype=torch.bool)
        boot = trunc & (self.cfg.truncation == "bootstrap")
        rew = torch.tensor([r.reward for r in train])
        adv, ret = gae(rew, v, lengths, boot, gamma, lam) if train else (torch.zeros(0, 1), torch.zeros(0, 1))
        inside = (
            torch.arange(t_max)[None, :] < lengths[:, None] if train else torch.zeros(0, 1, dtype=torch.bool)
        )
        a, g, vv = adv[inside], ret[inside], v[:, :-1][inside]
        # collective: the DP group -- the step's statistics over every rank's tokens
        n, sa, saa, sg, sgg, se, see = dp_sum(
            [float(a.numel()), float(a.sum()), float((a * a).sum()), float(g.sum()), float((g * g).sum()),
             float((g - vv).sum()), float(((g - vv) ** 2).sum())]
        )  # fmt: skip
        n1 = max(n, 1.0)
        a_mean, a_var = sa / n1, max(saa / n1 - (sa / n1) ** 2, 0.0)
        g_var, e_var = max(sgg / n1 - (sg / n1) ** 2, 0.0), max(see / n1 - (se / n1) ** 2, 0.0)
        if self.cfg.whiten_advantages:
            adv = torch.where(inside, (adv - a_mean) / (a_var**0.5 + 1e-6), 0.0)
        self._targets = {}
        per = {}
        for k, r in enumerate(train):
            t = len(r.response_ids)
            per[id(r)] = adv[k, :t].tolist()
            self._targets[id(r)] = (v[k, :t].tolist(), ret[k, :t].tolist())
        nested = [[per.get(id(r), [0.0] * len(r.response_ids)) for r in grp] for grp in groups]
        metrics = {
            "critic/advantage_mean": a_mean,
            "critic/advantage_std": a_var**0.5,
            "critic/return_mean": sg / n1,
            # 1 - Var(G - V) / Var(G): 1 a perfect critic, 0 no better than a constant, < 0 worse
            # (0 when the returns hardly vary: the ratio would be noise over ~0)
            "critic/explained_variance": 1.0 - e_var / g_var if g_var > 1e-6 else 0.0,
            # 0.5 mean (V - G)^2 before the critic trains on these rollouts: its prediction error on
            # data it has not seen (critic/value_loss is the error while fitting them)
            "critic/value_error": 0.5 * see / n1,
            "critic/truncated_rate": float(trunc.float().mean()) if train else 0.0,
        }
        return nested, from_last_stage(metrics)

    def update(self, groups: list[list[Rollout]]) -> dict[str, float]:
        """`minibatches` optimizer steps of the value loss towards the returns of the last
        `advantages` call. critic/* metrics: the mean over the steps."""
        k, g = self.cfg.minibatches, max(len(grp) for grp in groups) if groups else 1
        # rollout j of group i goes to part (i * G + j) mod k: the same split in every DP layout
        parts = [
            [
                r
                for grp in groups
                for j, r in enumerate(grp)
                if not r.reward_failed and (r.group * g + j) % k == m
            ]
            for m in range(k)
        ]
        counts = dp_sum(
            [float(len(p)) for p in parts]
        )  # collective: the DP group; skip parts empty everywhere
        steps = [p for p, c in zip(parts, counts) if c > 0]
        sums: dict[str, float] = {}
        for part in steps:
            m = self._step(part)
            for key, x in m.items():
                sums[key] = sums.get(key, 0.0) + x / len(steps)
        return sums

    def _step(self, rollouts: list[Rollout]) -> dict[str, float]:
        items = _items(rollouts)
        micro, n = self.batches.build(items)
        mbs = self.batches.mbs
        for k, r in enumerate(rollouts):  # targets on the positions of V_0..V_{T-1}; V_T trains nothing
            b, row = micro[k // mbs], k % mbs
            p, t = len(r.prompt_ids), len(r.response_ids)
            old, ret = self._targets[id(r)]
            b.setdefault("returns", torch.zeros_like(b["mask"]))
            b.setdefault("old_values", torch.zeros_like(b["mask"]))
            b["returns"][row, p - 1 : p - 1 + t] = torch.tensor(ret, device=b["mask"].device)
            b["old_values"][row, p - 1 : p - 1 + t] = torch.tensor(old, device=b["mask"].device)
            b["mask"][row, p - 1 + t] = 0.0
        for b in micro:
            b.setdefault("returns", torch.zeros_like(b["mask"]))
            b.setdefault("old_values", torch.zeros_like(b["mask"]))
        units = normalize_step(micro, n, token_level=True)
        result = train_step(
            self.chunks,
            self.optimizer,
            self.scheduler,
            micro,
            forward_step=self.forward_step,
            guard=self.guard,
            **self.batches.shape(micro),
        )
        dp = ps.get_data_parallel_world_size(with_context_parallel=True)
        vals = [(b, m) for b, m in zip(micro, result.metrics) if m]
        loss = sum(float(m["value_loss"]) for _, m in vals) / n  # already over the step's count
        w = dp / max(units[True], 1.0)
        local = {
            "critic/value_loss": loss,
            "critic/value_clip_frac": sum(float(m["clip_frac"]) * float(m["tokens"]) for _, m in vals) * w,
            "critic/value_mean": sum(float(m["value_mean"]) * float(m["tokens"]) for _, m in vals) * w,
        }
        out = from_last_stage(local)
        out["critic/grad_norm"] = float(result.grad_norm or 0.0)
        out["critic/skipped_iterations"] = float(self.guard.total)
        return out

    def save(self, run_dir: str, step: int, keep_last: int = 0) -> None:
        """The critic's checkpoint (weights, optimizer, schedule) under <run_dir>/critic."""
        checkpoint.save_checkpoint(
            critic_dir(run_dir), step, self.chunks, self.optimizer, self.scheduler, {}, keep_last=keep_last
        )

    def resume(self, run_dir: str, step: int) -> None:
        """Continue from the run's own critic checkpoint of `step` (the policy's RNG is kept)."""
        path = checkpoint.checkpoint_dir(critic_dir(run_dir), step)
        bad = checkpoint.verify(path, crc=False)  # every rank checks: sizes only
        if bad is not None:
            raise FileNotFoundError(f"resuming the policy at step {step} needs its critic: {bad}")
        checkpoint.load_checkpoint(
            critic_dir(run_dir), self.chunks, self.optimizer, self.scheduler, step, rng=False
        )


def critic_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "critic")


def load_critic(init_from: str, policy_dir: str, chunks, optimizer) -> str:
    """Load the critic's starting weights per `rl.critic.init_from` (CriticConfig); returns what was
    loaded, for the banner."""
    if init_from == "policy":
        step = checkpoint.load_model_weights(
            policy_dir, chunks, optimizer=optimizer, exclude=("output_layer.",)
        )
        return f"policy {policy_dir} step {step} (zero value head)"
    if os.path.isfile(os.path.join(init_from, "head.pt")):  # a reward model's directory
        _load_reward_model(init_from, chunks)
        optimizer.reload_model_params()
        return f"reward model {init_from}"
    for d in (critic_dir(init_from), init_from):
        if checkpoint.latest_step(d) is not None:
            step = checkpoint.load_model_weights(d, chunks, optimizer=optimizer)
            return f"critic {d} step {step}"
    raise FileNotFoundError(
        f"rl.critic.init_from={init_from!r}: not 'policy', a reward-model directory (head.pt + backbone/) "
        "or a run directory with a critic checkpoint (<dir>/critic/checkpoints/latest)"
    )


def _load_reward_model(path: str, chunks) -> None:
    """Backbone and scalar head of a reward-model directory (megatron_step.rl.reward_model) into the
    critic's chunks; the backbone's dist-checkpoint is resharded to this layout."""
    blob = torch.load(os.path.join(path, "head.pt"), map_location="cpu", weights_only=True)
    for c in chunks:
        module = c.module
        sharded = {k: v for k, v in module.sharded_state_dict().items() if not k.startswith("output_layer.")}
        loaded = dist_checkpointing.load(sharded, os.path.join(path, "backbone"))
        missing, _ = module.load_state_dict(loaded, strict=False)
        _check_missing(missing, path)
        if module.post_process:
            head = module.output_layer
            with torch.no_grad():
                head.weight.copy_(blob["head"]["weight"])
                head.bias.copy_(blob["head"]["bias"])


def _check_missing(missing: list[str], where: str) -> None:
    bad = [k for k in missing if not k.startswith("output_layer.") and not k.endswith("_extra_state")]
    if bad:
        raise ValueError(
            f"{where}: the checkpoint lacks {bad[:5]} ({len(bad)} keys) of the critic's backbone"
        )


__all__ = [
    "Critic",
    "CriticConfig",
    "ValueHead",
    "build_critic_model",
    "critic_model_config",
    "gae",
    "value_loss",
]
