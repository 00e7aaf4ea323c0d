"""Actor-critic (megatron_step.rl.critic): GAE and truncated bootstrapping by hand, the value loss by
hand, the critic's value pass and value-loss steps under DP2 / TP2 + SP / EP2 / PP2 equal to one
process, its initialisation from a reward model, and (in the stage) the value loss falling on the
embedded task."""

from __future__ import annotations

import json
import os

import pytest
import torch
from megatron.core import parallel_state as ps

from megatron_step import platform
from megatron_step.platform import ParallelConfig
from megatron_step.rl.buffer import Rollout
from megatron_step.rl.critic import Critic, CriticConfig, critic_model_config, gae, value_loss
from megatron_step.rl.reward_model import RewardModel
from megatron_step.testing import run_distributed
from megatron_step.testing.golden import read_run
from megatron_step.training import checkpoint
from megatron_step.training.setup import build_model_and_optimizer
from megatron_step.training.step import dp_mean
from tests.rl.test_rl_layouts import SEED, _dp_gather, _model_cfg, _optim, _prompts

T = torch.tensor


# ---------------------------------------------------------------------------------------------
# GAE and the value loss by hand
# ---------------------------------------------------------------------------------------------
def test_gae_with_gamma_lambda_one_is_reward_minus_value_and_a_truncated_response_bootstraps():
    values = T([[0.2, 0.5, 0.7, 0.9]])  # V_0, V_1, V_2 and V_T = 0.9
    adv, ret = gae(T([1.0]), values, T([3]), T([False]), 1.0, 1.0)
    assert torch.allclose(adv, T([[0.8, 0.5, 0.3]]))  # R - V_t, V_T unused at EOS
    assert torch.allclose(ret, T([[1.0, 1.0, 1.0]]))
    adv, ret = gae(T([1.0]), values, T([3]), T([True]), 1.0, 1.0)
    # cut at max length: R^ = V_T in place of the reward, A_t = V_T - V_t
    assert torch.allclose(adv, T([[0.7, 0.4, 0.2]]))
    assert torch.allclose(ret, T([[0.9, 0.9, 0.9]]))


def test_gae_with_discount_and_trace_decay_by_hand():
    # T = 2, V = (0.2, 0.5), R = 1, gamma 0.9, lam 0.5:
    # terminal:  d1 = 1 - 0.5 = 0.5,  d0 = 0.9 * 0.5 - 0.2 = 0.25,  A0 = 0.25 + 0.45 * 0.5 = 0.475
    # truncated (V_T = 0.4, no reward): d1 = 0.9 * 0.4 - 0.5 = -0.14,  A0 = 0.25 + 0.45 * -0.14 = 0.187
    # a second, longer row checks that the padding of the short one is ignored
    values = T([[0.2, 0.5, 0.4, 99.0], [0.1, 0.1, 0.1, 0.1]])
    adv, ret = gae(T([1.0, 0.0]), values, T([2, 3]), T([False, False]), 0.9, 0.5)
    assert torch.allclose(adv[0], T([0.475, 0.5, 0.0]))
    assert torch.allclose(ret[0], T([0.675, 1.0, 0.0]))
    # row 2, R = 0, V = 0.1 everywhere: d2 = -0.1, d1 = d0 = 0.09 - 0.1 = -0.01
    a2 = -0.1
    a1 = -0.01 + 0.45 * a2
    a0 = -0.01 + 0.45 * a1
    assert torch.allclose(adv[1], T([a0, a1, a2]))
    adv, _ = gae(T([1.0, 0.0]), values, T([2, 3]), T([True, False]), 0.9, 0.5)
    assert torch.allclose(adv[0], T([0.187, -0.14, 0.0]))


def test_value_loss_and_its_clipped_form_by_hand():
    v, g, mask = T([[1.0, 2.0, 7.0]]), T([[0.0, 0.0, 0.0]]), T([[1.0, 1.0, 0.0]])
    loss, m = value_loss(v, g, torch.zeros(1, 3), mask, None)
    assert loss.item() == pytest.approx(0.5 * (1 + 4) / 2) and m["tokens"] == 2
    # old values 0.5, 2.5 and clip 0.2: clipped values 0.7, 2.3; the larger error per token 1 and 5.29
    loss, m = value_loss(v, g, T([[0.5, 2.5, 0.0]]), mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * (1 + 5.29) / 2) and m["clip_frac"] == pytest.approx(0.5)
    loss, _ = value_loss(v, g, T([[0.5, 2.5, 0.0]]), mask, 0.2, normalizer=4.0)
    assert loss.item() == pytest.approx(0.5 * (1 + 5.29) / 4)


def test_actor_critic_config_refuses_what_it_cannot_run():
    from megatron_step.rl.config import RLConfig

    with pytest.raises(ValueError, match="rl.critic.truncation='cut'"):
        CriticConfig(truncation="cut")
    with pytest.raises(ValueError, match="rl.advantage=gae with rl.rollout=e3rl"):
        RLConfig(advantage="gae", rollout="e3rl", max_new_tokens=40)
    with pytest.raises(ValueError, match="rl.advantage='ppo'"):
        RLConfig(advantage="ppo")
    with pytest.raises(ValueError, match="rl.gamma=0"):
        RLConfig(gamma=0.0)


# ---------------------------------------------------------------------------------------------
# the critic under every layout
# ---------------------------------------------------------------------------------------------
CRITIC = CriticConfig(minibatches=2, lr=0.05, whiten_advantages=True)  # the whitening path too
G = 2


def _groups(vocab: int) -> list[list[Rollout]]:
    """This DP rank's share of 8 prompt groups x G rollouts: fixed tokens, responses of 3..10 tokens,
    the first of each group cut at max length (truncated), the second ended by EOS."""
    prompts = _prompts(vocab)
    gen = torch.Generator().manual_seed(3)
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = len(prompts) // dp
    groups = []
    for i in range(len(prompts)):
        grp = []
        for j in range(G):
            n = int(torch.randint(3, 11, (1,), generator=gen))
            resp = torch.randint(4, vocab, (n,), generator=gen).tolist()
            reward = float(sum(resp) % 3) / 2
            grp.append(Rollout(prompts[i], resp, [0.0] * n, reward, group=i, version=0, truncated=j == 0))
        groups.append(grp)
    return groups[rank * per : (rank + 1) * per]


def critic_steps(rank, world_size, parallel_kw, policy_dir):
    """A critic from the policy checkpoint in `parallel_kw`'s layout: GAE advantages, two value-loss
    steps (minibatches=2), the values afterwards. The 1-process run writes the policy checkpoint."""
    parallel = ParallelConfig(**parallel_kw)
    platform.setup(parallel, seed=SEED)
    if not os.path.isdir(policy_dir):
        chunks, opt, sched = build_model_and_optimizer(_model_cfg(), parallel, _optim(), 1)
        opt.step()  # zero gradients, no weight decay: the weights stay; the optimizer state exists to save
        checkpoint.save_checkpoint(policy_dir, 1, chunks, opt, sched, {})
    critic = Critic.build(_model_cfg(), parallel, _optim(), CRITIC, 2, 2, policy_dir)
    groups = _groups(_model_cfg().vocab_size)
    adv, first = critic.advantages(groups, gamma=1.0, lam=0.95)
    update = critic.update(groups)
    adv2, after = critic.advantages(groups, gamma=1.0, lam=0.95)
    values = critic.values([r for g in groups for r in g])
    return {
        "last_stage": ps.is_pipeline_last_stage(),
        "adv": _dp_gather([a for g in adv for a in g]),
        "adv2": _dp_gather([a for g in adv2 for a in g]),
        "values": _dp_gather(values),
        "first": dp_mean(first),
        "update": dp_mean(update),
        "after": dp_mean(after),
    }


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    policy_dir = str(tmp_path_factory.mktemp("critic") / "policy")
    (res,) = run_distributed(critic_steps, 1, {}, policy_dir)
    return policy_dir, res


def _close(a, b, what, rtol):
    a, b = torch.tensor(a), torch.tensor(b)
    err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    assert err <= rtol, f"{what}: relative error {err:.2e}"


def test_the_critic_learns_and_its_advantages_are_whitened(one_process):
    _, ref = one_process
    flat = torch.tensor([x for a in ref["adv"] for x in a])
    assert flat.mean().abs() < 1e-5 and (flat.std(correction=0) - 1).abs() < 1e-4
    assert len(ref["values"]) == 8 * G and all(len(v) >= 4 for v in ref["values"])
    # a zero head: values 0 at first, so the returns are the rewards (+0 bootstrap) and EV is 0
    assert ref["first"]["critic/explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert ref["update"]["critic/value_loss"] > 0
    # two steps towards the returns: the values are no longer 0 and explain some of the variance
    assert max(abs(x) for v in ref["values"] for x in v) > 1e-3
    assert ref["after"]["critic/explained_variance"] > 0.0
    assert ref["adv2"] != ref["adv"]


LAYOUTS = {"dp2": {}, "tp2_sp": {"tp": 2}, "ep2": {"ep": 2}, "pp2": {"pp": 2}}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_critic_under_a_layout_matches_one_process(name, one_process):
    policy_dir, ref = one_process
    results = run_distributed(critic_steps, 2, LAYOUTS[name], policy_dir)
    got = next(r for r in results if r["last_stage"])  # the values live on the last pipeline stage
    for key in ("adv", "adv2", "values"):
        assert [len(x) for x in got[key]] == [len(x) for x in ref[key]]
        _close([x for a in got[key] for x in a], [x for a in ref[key] for x in a], key, 1e-4)
    for part in ("first", "update", "after"):
        for k, v in ref[part].items():
            if k.endswith("grad_norm") or k.endswith("_mean") or "loss" in k or "variance" in k:
                assert got[part][k] == pytest.approx(v, rel=2e-4, abs=1e-6), f"{part} {k}"


def critic_with_failed_rewards(rank, world_size, policy_dir):
    """EP2, every reward of rank 1 failed: that rank has nothing to score or fit, yet must run the
    collective forwards of the value pass and the value steps with its peer (padding)."""
    parallel = ParallelConfig(ep=2)
    platform.setup(parallel, seed=SEED)
    critic = Critic.build(_model_cfg(), parallel, _optim(), CRITIC, 2, 2, policy_dir)
    groups = _groups(_model_cfg().vocab_size)
    for r in (r for g in groups for r in g):
        r.reward_failed = rank == 1
    adv, _ = critic.advantages(groups, gamma=1.0, lam=1.0)
    return adv, dp_mean(critic.update(groups))["critic/value_loss"]


def test_a_rank_whose_rewards_all_failed_keeps_the_critic_in_lockstep(one_process):
    policy_dir, _ = one_process
    (adv0, loss0), (adv1, loss1) = run_distributed(critic_with_failed_rewards, 2, policy_dir)
    assert loss0 == pytest.approx(loss1) and loss0 > 0
    tokens = [[x for grp in adv for a in grp for x in a] for adv in (adv0, adv1)]
    assert all(x == 0.0 for x in tokens[1]) and any(x != 0.0 for x in tokens[0])


# ---------------------------------------------------------------------------------------------
# initialisation from a reward model
# ---------------------------------------------------------------------------------------------
def critic_from_reward_model(rank, world_size, root):
    """A reward model with a random head saved, a critic loaded from it: the critic's V_T (the value
    after the last token) equals the reward model's score of the same sequence."""
    platform.setup(ParallelConfig(), seed=SEED)
    from megatron_step.models.step_flash import build_step_flash

    cfg = critic_model_config(_model_cfg())
    rm = RewardModel.from_backbone(build_step_flash(cfg, ParallelConfig()), {})
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    torch.nn.init.normal_(rm.head.bias, std=0.5)
    rm.save(os.path.join(root, "rm"))
    rollouts = [
        Rollout(p, [5, 6, 7], [0.0] * 3, 0.0, group=i, version=0)
        for i, p in enumerate(_prompts(cfg.vocab_size)[:3])
    ]
    critic = Critic.build(
        _model_cfg(), ParallelConfig(), _optim(), CriticConfig(init_from=os.path.join(root, "rm")), 1, 2, None
    )
    v_t = [v[-1] for v in critic.values(rollouts)]
    seqs = [r.prompt_ids + r.response_ids for r in rollouts]
    n = max(len(s) for s in seqs)
    tokens = torch.tensor([s + [0] * (n - len(s)) for s in seqs])
    with torch.no_grad():
        scores = rm.eval()(tokens, torch.tensor([len(s) for s in seqs])).tolist()
    return v_t, scores, critic.loaded


def test_a_critic_from_a_reward_model_scores_as_the_reward_model(tmp_path):
    (res,) = run_distributed(critic_from_reward_model, 1, str(tmp_path))
    v_t, scores, loaded = res
    assert "reward model" in loaded
    assert max(abs(s) for s in scores) > 0.1  # a random head: the comparison means something
    assert v_t == pytest.approx(scores, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # make test-all (~2.5 min); by default the stage's critic runs, saves and resumes in
# tests/rl/test_rl_loop.py (the resume tests) and its value loss is tested above
def test_the_actor_critic_stage_trains_its_critic_and_saves_it(golden_run, embedded_data, tmp_path):
    """6 actor-critic steps from the golden warm-up checkpoint: the critic's prediction error on each
    step's fresh rollouts (before it trains on them) falls from the zero head's; the critic is saved
    with the policy, and a next run starts its critic from that checkpoint.

    The reward is 1 on every rollout (tests.rl._rewards_fixtures:one), so the critic's targets do not
    depend on what the policy happens to sample (with the task's reward, a policy that gets everything
    wrong for a few steps on one CPU and not on another made the zero head's error ~0 there): the zero
    head's error is 0.5 (0 - 1)^2 on every token and must fall well below it."""
    from tests.rl.test_rl_loop import run

    sft = os.path.join(golden_run("rl_sync"), "rl_sft")
    run_dir = str(tmp_path / "gae")
    extra = [
        "rl.advantage=gae",
        "rl.max_new_tokens=24",  # the golden run's
        "rl.group_size=4",
        "train.steps=6",
        "train.eval_interval=0",  # no held-out pass: the critic is what is measured
        "train.save_interval=6",
        "rl.critic.minibatches=4",
        "rl.reward_fn=tests.rl._rewards_fixtures:one",
        "rl.critic.truncation=terminal",  # G = 1 on every token, cut responses too
    ]
    run_distributed(run, 1, embedded_data, run_dir, sft, extra)
    curves = read_run(run_dir, ["critic/value_error", "critic/value_loss", "critic/value_mean"])
    err = [v for _, v in sorted(curves["critic/value_error"].items())]
    assert len(err) == 6 and err[0] == pytest.approx(0.5, abs=1e-6), curves  # the zero head
    assert sum(err[-3:]) / 3 < 0.1 * err[0], curves
    assert checkpoint.latest_step(os.path.join(run_dir, "critic")) == 6
    again = str(tmp_path / "again")
    more = [*extra[:3], "train.steps=1", "train.eval_interval=0", f"rl.critic.init_from={run_dir}"]
    run_distributed(run, 1, embedded_data, again, sft, more)
    with open(os.path.join(again, "run_info.json")) as f:
        assert f"critic {run_dir}/critic step 6" in json.load(f)["critic_from"]
