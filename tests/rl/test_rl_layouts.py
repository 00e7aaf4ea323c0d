"""RL under TP / EP / DP (gloo, CPU): the same prompts give token-identical rollouts -- greedy, and
sampled with the keyed randomness -- and log-probs within 1e-5 of one process; one RL update gives the
same weights (rtol 2e-5); E3RL rollouts with erasures are identical; held-out accuracy over uneven
shards equals one process; ranks with uneven work (prompt lengths, counts, stop positions, failed
rewards) stay in lockstep instead of hanging. Layouts: DP2, TP2 + SP, EP2, PP2 (with MTP-3 and
without MTP), PP2 x VPP2 on an uneven layout; TP2 x EP2, EP2 x DP4 and PP2 x EP2 on 4 ranks (slow)."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from megatron_step import platform
from megatron_step.config.run import RLRunConfig, load_run_config
from megatron_step.data.config import DataConfig
from megatron_step.data.pipeline import run_tokenizer
from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.optim.config import OptimConfig
from megatron_step.platform import ParallelConfig
from megatron_step.rl.buffer import Rollout
from megatron_step.rl.config import E3RLConfig, RLConfig
from megatron_step.rl.engine import Engine, SamplingParams
from megatron_step.rl.erasable import E3RLPolicy, generate_erasable
from megatron_step.rl.erl import ERLConfig, generate_erl
from megatron_step.rl.lockstep import keyed_uniforms
from megatron_step.rl.lookup import SearchTool, make_world
from megatron_step.rl.losses import PolicyLossConfig
from megatron_step.rl.policy import PolicyUpdate, pack, record_old_logp, token_logp
from megatron_step.rl.reward_model import PreferenceReward, RewardModel
from megatron_step.rl.reward_pool import RewardRunner
from megatron_step.rl.rewards import default_reward
from megatron_step.rl.rollouts import Evaluator, RolloutSampler
from megatron_step.rl.routing_confidence import merge_stages, rollout_confidence
from megatron_step.rl.tasks import ArithmeticTask
from megatron_step.stages.rl import train_rl
from megatron_step.testing import run_distributed
from megatron_step.testing.golden import compare, format_rows, read_run
from megatron_step.training.setup import build_model_and_optimizer
from megatron_step.training.step import dp_mean
from tests.golden import runs as golden_runs
from tests.rl.test_erl import ToyTokenizer

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SEED = 1234
EOS = 3
G = 2  # samples per prompt
PROMPT_LENS = (3, 9, 5, 12, 7, 4, 10, 6)  # 8 prompts: DP ranks get different lengths and stop times
NEW_TOKENS = 10


def _model_cfg():
    """The tiny preset as the RL stage runs it (examples/rl/rl_tiny.yaml): routing replayed, no MTP
    loss, the router's aux-loss-free bias fixed (padding positions would otherwise count as load)."""
    m = tiny()
    return dataclasses.replace(
        m, routing_replay=True, mtp_loss_weights=[0.0] * m.mtp_num_layers, router_bias_update_rate=0.0
    )


def _optim(kind: str = "adam"):
    """Adam (ZeRO-1 distributed optimizer) with eps = 1: its first step lr * g / (|g| + eps) is then a
    continuous function of the gradient, so equal weights mean equal gradients (with a small eps it is
    lr * sign(g), which flips on gradients that round across 0 in a different summation order)."""
    lr = 0.05 if kind == "adam" else 3e-3
    return OptimConfig(
        optimizer=kind,
        lr=lr,
        min_lr=lr,
        lr_schedule="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_eps=1.0,
    )


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _build(parallel_kw: dict, weights: str, save: bool, optim: str = "adam", model_cfg=None):
    parallel = ParallelConfig(**parallel_kw)
    platform.setup(parallel, seed=SEED)
    chunks, opt, sched = build_model_and_optimizer(
        model_cfg or _model_cfg(), parallel, _optim(optim), steps=1
    )
    modules = [c.module for c in chunks]
    if save:
        _save(modules, weights)
    else:
        _load(modules, weights)
        opt.reload_model_params()
    return chunks, opt, sched


def _sharded(modules) -> dict:
    """The model's sharded state dict: one chunk's, or one entry per virtual pipeline stage (its
    tensors carry global keys, so any layout loads it)."""
    if len(modules) == 1:
        return modules[0].sharded_state_dict()
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(modules)}


def _save(modules, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(_sharded(modules), path)


def _load(modules, path: str) -> None:
    state = dist_checkpointing.load(_sharded(modules), path)
    for i, m in enumerate(modules):
        m.load_state_dict(state if len(modules) == 1 else state[f"model{i}"])


def _dp_gather(local: list) -> list:
    """This DP rank's list, concatenated over the DP ranks in rank order (the same on every rank)."""
    parts = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(parts, local, group=ps.get_data_parallel_group())
    return [x for p in parts for x in p]


def _reference_model(parallel_kw, weights: str) -> list:
    """A frozen reference model for the KL term, in the layout of `parallel_kw` (set up already): the
    initial weights plus fixed noise (so that KL(pi || pi_ref) > 0), made and saved by the first
    1-process run under <weights>_ref and loaded (resharded) by the others."""
    parallel, path = ParallelConfig(**parallel_kw), weights + "_ref"
    stages = range(parallel.vpp) if parallel.vpp else [None]
    modules = [build_step_flash(_model_cfg(), parallel, vp_stage=v).requires_grad_(False) for v in stages]
    if not os.path.isdir(path) and dist.get_world_size() == 1:
        _load(modules, weights)
        g = torch.Generator().manual_seed(5)
        for p in modules[0].parameters():
            p.add_(0.2 * p.detach().abs().mean() * torch.randn(p.shape, generator=g))
        _save(modules, path)
    else:
        _load(modules, path)
    return modules


def rollouts_and_update(rank, world_size, parallel_kw, weights, out, save, kind, model_cfg=None, mbs=2):
    """Rollouts of this DP rank's share of the prompts, then one MIS-PO update on them; the final
    weights go to `out`. Returns the rollouts of all ranks in global order, and the update's loss.
    kind: plain | spec (plain rollouts by MTP speculative decoding) | minibatches (plain rollouts,
    GRPO loss, 2 actor minibatches: 2 optimizer steps) | e3rl (erasable rollouts)
    | macro (plain rollouts, MACRO in the layer-wise optimizer) | kl (plain rollouts, a KL term to
    a frozen reference model, rl.loss.kl_coef = 0.5)."""
    optim = "macro" if kind == "macro" else "adam"
    chunks, opt, sched = _build(parallel_kw, weights, save, optim, model_cfg)
    # spec: MTP speculative decoding (3 drafts), coupled acceptance -- plain decoding's tokens
    spec = {"speculative": 3, "accept": "coupled"} if kind == "spec" else {}
    engine = Engine(chunks, eos_id=EOS, routing_confidence="share", **spec)
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    prompts = _prompts(_model_cfg().vocab_size)
    per = len(prompts) // dp
    rows = [(i, j) for i in range(r * per, (r + 1) * per) for j in range(G)]  # (prompt id, sample)
    mine = [prompts[i] for i, _ in rows]
    greedy = []
    if kind == "erl":  # tool rollouts with rollbacks: a word-level codec whose tags a random model hits
        ecfg = ERLConfig(max_rollbacks=2, max_step_tokens=6, max_steps=3)
        tool = SearchTool(make_world(0))
        gens = generate_erl(
            engine, mine, tool, SamplingParams(max_new_tokens=3 * NEW_TOKENS, seed=11), ecfg,
            tokenizer=ToyTokenizer(_model_cfg().vocab_size), keys=rows,
        )  # fmt: skip
    elif kind == "e3rl":
        ecfg = E3RLConfig(segment_len=4, num_segments=3, threshold_std=0.0, max_erasures=2)
        groups_of = [i for i, _ in rows]
        gens = generate_erasable(
            engine, mine, groups_of, SamplingParams(seed=11), E3RLPolicy(ecfg), keys=rows
        )
    else:
        greedy = engine.generate(mine, SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True), keys=rows)
        gens = engine.generate(mine, SamplingParams(max_new_tokens=NEW_TOKENS, seed=11), keys=rows)
    groups = [
        [
            Rollout(
                prompt_ids=g.prompt_ids,
                response_ids=g.response_ids,
                rollout_logp=g.logprobs,
                reward=float(sum(g.response_ids) % 3),  # any fixed function of the tokens
                group=i,
                version=0,
                routing=g.routing,
                sampled_mask=g.info.get("sampled_mask"),
            )
            for (i, _), g in zip(rows[k : k + G], gens[k : k + G])
        ]
        for k in range(0, len(rows), G)
    ]
    loss_cfg = PolicyLossConfig(
        "grpo" if kind == "minibatches" else "mispo", kl_coef=0.5 if kind == "kl" else 0.0
    )
    reference = _reference_model(parallel_kw, weights) if kind == "kl" else None
    update = PolicyUpdate(
        chunks, opt, sched, loss_cfg, micro_batch_size=mbs, reference=reference, routing_confidence="share",
        minibatches=2 if kind == "minibatches" else 1,
    )  # fmt: skip
    calls = [0, 0]  # forwards of the MTP block, and of its model chunk, during the update
    hooks = []
    for c in chunks:
        if getattr(c.module, "mtp_process", False):
            hooks.append(c.module.mtp.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1)))
            hooks.append(c.module.register_forward_hook(lambda *a: calls.__setitem__(1, calls[1] + 1)))
    metrics = update(groups)
    for h in hooks:
        h.remove()
    metrics.update(rollout_confidence([g.confidence for g in gens if g.confidence]))
    _save([c.module for c in chunks], out)
    summary = [
        (
            x.response_ids,
            x.logprobs,
            x.info.get("erasures", 0),
            x.info.get("rollbacks", 0),
            x.info.get("sampled_mask"),
        )
        for x in gens
    ]
    return {
        "sampled": _dp_gather(summary),
        "greedy": _dp_gather([(x.response_ids, x.logprobs) for x in greedy]),
        "loss": dp_mean(metrics)["policy/loss"],
        "metrics": merge_stages(dp_mean(metrics)),
        "mtp_calls": calls[0],  # MTP block forwards / model forwards of its chunk during the update
        "mtp_chunk_calls": calls[1],
        "optimizer_steps": sched.num_steps,
        "spec": (engine.stats["spec_proposed"], engine.stats["spec_accepted"]),  # this rank's counters
        "idle_forwards": _dp_gather([engine.last_kv.get("idle_forwards", 0)]),  # ERL's lockstep padding
    }


def full_weights(rank, world_size, run_dirs, model_cfg=None):
    """Each run dir's latest weights in a 1-process model, by name."""
    platform.setup(ParallelConfig(), seed=SEED)
    out = []
    for d in run_dirs:
        module = build_step_flash(model_cfg or _model_cfg(), ParallelConfig())
        _load([module], d)
        out.append({k: v.detach().clone() for k, v in module.state_dict().items() if "_extra" not in k})
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_layouts")
    refs = {}
    for kind in ("plain", "e3rl", "macro", "kl", "erl"):
        weights, out = str(root / "weights"), str(root / f"ref_{kind}")
        (res,) = run_distributed(rollouts_and_update, 1, {}, weights, out, kind == "plain", kind)
        refs[kind] = {"res": res, "out": out}
    return {"root": root, "weights": str(root / "weights"), **refs}


def _same_rollouts(got, want, key):
    assert len(got[key]) == len(want[key])
    for i, (a, b) in enumerate(zip(got[key], want[key])):
        assert a[0] == b[0], f"{key} rollout {i}: tokens {a[0]} vs one process {b[0]}"
        worst = max((abs(x - y) for x, y in zip(a[1], b[1])), default=0.0)
        assert worst <= 1e-5, f"{key} rollout {i}: log-prob differs by {worst:.2e}"
        assert a[2:] == b[2:], f"{key} rollout {i}: erasures {a[2:]} vs {b[2:]}"


def _same_weights(reference, kind, out, rtol=2e-5, update_rtol=1e-4, model_cfg=None):
    """Every weight within `rtol` of the 1-process run (relative Frobenius error per tensor), and,
    since one small step barely moves a weight, the update itself (final - initial) of every tensor
    the reference moved within `update_rtol` (measured: <= 4e-5 for the router of TP2+SP, ~1e-5
    elsewhere -- fp32 sums in another order, on small policy-gradient terms that cancel)."""
    dirs = [reference["weights"], reference[kind]["out"], out]
    init, ref, got = run_distributed(full_weights, 1, dirs, model_cfg)[0]
    moved = [k for k in ref if not torch.equal(ref[k], init[k])]
    assert len(moved) > 10, f"the reference update moved only {moved}: the comparison would prove little"
    for k in ref:
        err = ((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)).item()
        assert err <= rtol or (got[k] - ref[k]).abs().max() < 1e-9, f"{k}: relative weight error {err:.3e}"
    upd = {k: ((got[k] - ref[k]).norm() / (ref[k] - init[k]).norm()).item() for k in moved}
    worst = max(upd, key=upd.get)
    assert upd[worst] <= update_rtol, f"{worst}: relative error of its update {upd[worst]:.3e}"
    assert all(torch.equal(got[k], init[k]) for k in ref if k not in moved)
    return upd[worst]


LAYOUTS = {
    "dp2": ({}, 2),
    "tp2_sp": ({"tp": 2}, 2),  # SP is on with TP (Megatron-Core requires it for MoE + TP training)
    "ep2": ({"ep": 2}, 2),
    "pp2": ({"pp": 2}, 2),  # MTP-3 on the last stage
    # interleaved (each rank's two chunks, the ring wraps) on an uneven split: 1 | 2 | 3 | 2 layers + MTP
    "pp2_vpp2_uneven": ({"pp": 2, "pipeline_layout": "Et|tt|ttt|ttmmmL"}, 2),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_rollouts_and_one_update_match_one_process(name, reference, tmp_path):
    kw, world = LAYOUTS[name]
    want = reference["plain"]["res"]
    assert len({tuple(x[0]) for x in want["sampled"]}) > len(want["sampled"]) // 2  # not all alike
    got = run_distributed(
        rollouts_and_update, world, kw, reference["weights"], str(tmp_path), False, "plain"
    )[0]
    _same_rollouts(got, want, "greedy")
    _same_rollouts(got, want, "sampled")
    assert abs(got["loss"] - want["loss"]) <= 1e-5 * max(1.0, abs(want["loss"])), (
        got["metrics"],
        want["metrics"],
    )
    # Sigma_k of the training forward, per MoE layer (every pipeline stage's), over the step's tokens
    conf = {k: v for k, v in want["metrics"].items() if k.startswith("routing/confidence_train/")}
    m = _model_cfg()
    assert len(conf) == m.num_layers - m.first_k_dense and all(0 < v <= 1 for v in conf.values()), conf
    for k, v in conf.items():
        assert got["metrics"][k] == pytest.approx(v, rel=1e-5), k
    _same_weights(reference, "plain", str(tmp_path))


@pytest.mark.parametrize("name", ["ep2", "pp2_vpp2_uneven", pytest.param("tp2_sp", marks=pytest.mark.slow)])
def test_speculative_rollouts_match_one_process(name, reference, tmp_path):
    """MTP speculative decoding under EP (lockstep across DP ranks), interleaved PP (drafts on the
    last stage, broadcast; verification's results broadcast) and TP: greedy and coupled sampling give
    one process's plain-decoding rollouts, and the update the same loss and weights."""
    kw, world = LAYOUTS[name]
    want = reference["plain"]["res"]
    (got, *_) = run_distributed(
        rollouts_and_update, world, kw, reference["weights"], str(tmp_path), False, "spec"
    )
    proposed, accepted = got["spec"]  # rank 0 (the first pipeline stage under PP) counts them too
    assert proposed[0] > 0 and len(proposed) == 3 and all(0 <= a <= p for a, p in zip(accepted, proposed))
    _same_rollouts(got, want, "greedy")
    _same_rollouts(got, want, "sampled")
    assert abs(got["loss"] - want["loss"]) <= 1e-5 * max(1.0, abs(want["loss"]))
    _same_weights(reference, "plain", str(tmp_path))


@pytest.mark.parametrize("kw", [pytest.param({}, marks=pytest.mark.slow), {"pp": 2}], ids=["dp2", "pp2"])
def test_actor_minibatches_update_as_one_process(kw, reference, tmp_path):
    """rl.actor_minibatches = 2: the step's rollouts split into 2 minibatches by (group x G + j) mod 2,
    one optimizer step each with pi_old fixed before the first -- the second minibatch's PPO ratio
    moves off 1 (the first's is 1: sync rollouts); DP2 / PP2 give one process's weights and loss."""
    w, ref_out, out = reference["weights"], str(tmp_path / "ref"), str(tmp_path / "got")
    (want,) = run_distributed(rollouts_and_update, 1, {}, w, ref_out, False, "minibatches")
    got = next(r for r in run_distributed(rollouts_and_update, 2, kw, w, out, False, "minibatches") if r)
    assert want["optimizer_steps"] == 2 and want["metrics"]["policy/minibatches"] == 2
    # the mean over the 2 minibatches of the PPO ratio's token mean: (1 + r2) / 2 with r2 != 1
    assert abs(want["metrics"]["policy/ppo_ratio_mean"] - 1.0) > 1e-5, want["metrics"]
    assert abs(got["loss"] - want["loss"]) <= 1e-5 * max(1.0, abs(want["loss"]))
    ref = {"weights": w, "minibatches": {"out": ref_out}}
    _same_weights(ref, "minibatches", out)


@pytest.mark.slow
def test_pp2_without_mtp_matches_one_process(tmp_path):
    """A model without MTP modules under PP = 2 (the last stage holds only decoder layers and the head)."""
    cfg = dataclasses.replace(_model_cfg(), mtp_num_layers=0, mtp_loss_weights=[])
    w, ref_out, out = (str(tmp_path / d) for d in ("weights", "ref", "pp2"))
    (want,) = run_distributed(rollouts_and_update, 1, {}, w, ref_out, True, "plain", cfg)
    got = run_distributed(rollouts_and_update, 2, {"pp": 2}, w, out, False, "plain", cfg)[0]
    _same_rollouts(got, want, "greedy")
    _same_rollouts(got, want, "sampled")
    assert abs(got["loss"] - want["loss"]) <= 1e-5 * max(1.0, abs(want["loss"]))
    ref = {"weights": w, "plain": {"out": ref_out}}
    _same_weights(ref, "plain", out, model_cfg=cfg)


def _mtp_cfg(weight: float):
    """The RL model with its MTP-3 depths trained on the responses (stages.rl.rl_model_config)."""
    return dataclasses.replace(_model_cfg(), mtp_loss_weights=[weight] * _model_cfg().mtp_num_layers)


@pytest.mark.slow  # make test-all (~50 s); the default suite builds the RL model with its MTP weight
@pytest.mark.parametrize("kw", [{}, {"pp": 2}], ids=["dp2", "pp2"])
def test_mtp_trained_in_rl_updates_as_one_process(kw, tmp_path):
    """rl.mtp_loss_weight > 0: the MTP depths train on the sampled responses -- their weights move
    (with weight 0 they do not), their losses and draft accuracy are logged, and DP2 / PP2 (MTP on
    the last stage) give the weights and MTP losses of one process."""
    cfg, w = _mtp_cfg(0.3), str(tmp_path / "weights")
    ref_out, out, zero_out = (str(tmp_path / d) for d in ("ref", "got", "zero"))
    (want,) = run_distributed(rollouts_and_update, 1, {}, w, ref_out, True, "plain", cfg)
    got = next(r for r in run_distributed(rollouts_and_update, 2, kw, w, out, False, "plain", cfg) if r)
    for k in (1, 2, 3):
        key = f"train/mtp_{k}_loss"
        assert want["metrics"][key] > 0 and 0 <= want["metrics"][f"mtp/accuracy_{k}"] <= 1
        assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=1e-5), key
    ref = {"weights": w, "plain": {"out": ref_out}}
    _same_weights(ref, "plain", out, model_cfg=cfg)
    (zero_res,) = run_distributed(rollouts_and_update, 1, {}, w, zero_out, False, "plain", _mtp_cfg(0.0))
    init, trained, zero = run_distributed(full_weights, 1, [w, ref_out, zero_out], cfg)[0]
    mtp_keys = [k for k in init if k.startswith("mtp.")]
    assert mtp_keys and any(not torch.equal(trained[k], init[k]) for k in mtp_keys)
    assert all(torch.equal(zero[k], init[k]) for k in mtp_keys)  # weight 0: the heads stay
    # MTP runs in the training forward only (the pi_prox pass reads the main head): half the forwards
    # of its chunk; with weight 0 not at all (rl.policy.mtp_skipped)
    assert want["mtp_chunk_calls"] > 0 and 2 * want["mtp_calls"] == want["mtp_chunk_calls"], want
    assert zero_res["mtp_calls"] == 0 and zero_res["mtp_chunk_calls"] == want["mtp_chunk_calls"], zero_res


def test_the_rl_stage_builds_its_model_with_the_mtp_weight():
    from megatron_step.stages.rl import rl_model_config

    for w in (0.0, 0.1):
        cfg = load_run_config(
            os.path.join(REPO, "examples/rl/rl_tiny.yaml"), [f"rl.mtp_loss_weight={w}"], RLRunConfig
        )
        assert rl_model_config(cfg).mtp_loss_weights == [w] * cfg.model_config().mtp_num_layers


def test_the_loss_is_a_mean_over_the_step_not_the_microbatch(reference, tmp_path):
    """The 16 rollouts of the reference update (8 microbatches of 2, 1 process) in one microbatch, in
    microbatches of 3 (3, 3, 3, 3, 3, 1) and on two DP ranks in microbatches of 3 (3, 3, 2 each, the
    ranks' token counts unequal): the same loss and the same weights. A mean per microbatch would
    weigh a token of the lone last microbatch 3x one of the others, and differ here."""
    want = reference["plain"]["res"]
    lengths = [len(x[0]) for x in want["sampled"]]
    assert sum(lengths[:8]) != sum(lengths[8:]), lengths  # the DP ranks hold unequal token counts
    for name, world, mbs in (("one_microbatch", 1, 16), ("mbs3", 1, 3), ("dp2_mbs3", 2, 3)):
        out = str(tmp_path / name)
        got = run_distributed(
            rollouts_and_update, world, {}, reference["weights"], out, False, "plain", None, mbs
        )[0]
        assert abs(got["loss"] - want["loss"]) <= 1e-5 * max(1.0, abs(want["loss"])), (name, got["loss"])
        _same_weights(reference, "plain", out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw", [{"tp": 2, "ep": 2}, {"ep": 2}, {"pp": 2, "ep": 2}], ids=["tp2_ep2", "ep2_dp4", "pp2_ep2"]
)
def test_rollouts_and_one_update_match_one_process_on_four_ranks(kw, reference, tmp_path):
    want = reference["plain"]["res"]
    got = run_distributed(rollouts_and_update, 4, kw, reference["weights"], str(tmp_path), False, "plain")[0]
    _same_rollouts(got, want, "greedy")
    _same_rollouts(got, want, "sampled")
    _same_weights(reference, "plain", str(tmp_path))


@pytest.mark.parametrize(
    "kw",
    [
        {"ep": 2},
        pytest.param({"pp": 2}, marks=pytest.mark.slow),
        pytest.param({"tp": 2}, marks=pytest.mark.slow),
    ],
    ids=["ep2", "pp2", "tp2_sp"],
)
def test_e3rl_rollouts_with_erasures_match_one_process(kw, reference, tmp_path):
    want = reference["e3rl"]["res"]
    erasures = [x[2] for x in want["sampled"]]
    assert sum(erasures) >= 2 and erasures.count(0) >= 1, erasures  # erased and kept rows, unevenly
    got = run_distributed(rollouts_and_update, 2, kw, reference["weights"], str(tmp_path), False, "e3rl")[0]
    _same_rollouts(got, want, "sampled")
    _same_weights(reference, "e3rl", str(tmp_path))


@pytest.mark.parametrize("kw", [{"ep": 2}, {"pp": 2}], ids=["ep2", "pp2"])
def test_erl_tool_rollouts_with_rollbacks_match_one_process(kw, reference, tmp_path):
    """ERL's tool rollouts (rollbacks on the KV cache, teacher-forced tool results) and the update
    on them, tool tokens outside the loss: token-identical and the same weights as one process. Under
    EP2 the DP ranks' rollouts need different numbers of forwards; the one that finishes first pads."""
    want = reference["erl"]["res"]
    rollbacks = [x[3] for x in want["sampled"]]
    assert sum(rollbacks) >= 2 and sum(0 in x[4] for x in want["sampled"]) >= 2, rollbacks  # tool tokens
    got = run_distributed(rollouts_and_update, 2, kw, reference["weights"], str(tmp_path), False, "erl")[0]
    _same_rollouts(got, want, "sampled")
    _same_weights(reference, "erl", str(tmp_path))
    if "ep" in kw:
        assert max(got["idle_forwards"]) > 0, got["idle_forwards"]  # uneven work: lockstep padding ran


@pytest.mark.parametrize(
    "kw", [pytest.param({"ep": 2}, marks=pytest.mark.slow), {"pp": 2}], ids=["ep2", "pp2"]
)
def test_kl_to_a_reference_model_updates_as_one_process(kw, reference, tmp_path):
    """rl.loss.kl_coef > 0: the frozen reference model (resharded to the layout) gives the same
    pi_ref, KL metric, loss and weights as one process."""
    want = reference["kl"]["res"]
    assert want["metrics"]["policy/kl_ref"] > 1e-4, want["metrics"]  # the reference differs
    got = run_distributed(rollouts_and_update, 2, kw, reference["weights"], str(tmp_path), False, "kl")[0]
    _same_rollouts(got, want, "sampled")
    for key in ("policy/loss", "policy/kl_ref"):
        assert abs(got["metrics"][key] - want["metrics"][key]) <= 1e-5 * max(1.0, abs(want["metrics"][key]))
    _same_weights(reference, "kl", str(tmp_path))


def kl_by_hand(rank, world_size, weights):
    """One microbatch of greedy rollouts: PolicyUpdate's KL metric and its loss at kl_coef 0 and 0.5
    (gradients only, no optimizer: the weights stay put), and the k3 mean computed here from the two
    models' own log-probs."""
    chunks, _, _ = _build({}, weights, False)
    ref = _reference_model({}, weights)
    gens = Engine(chunks, eos_id=EOS).generate(
        _prompts(512)[:4], SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True)
    )
    group = [
        Rollout(g.prompt_ids, g.response_ids, g.logprobs, float(i % 2), 0, 0, routing=g.routing)
        for i, g in enumerate(gens)
    ]
    losses = {}
    for coef in (0.0, 0.5):
        update = PolicyUpdate(
            chunks, None, None, PolicyLossConfig("mispo", kl_coef=coef), micro_batch_size=4, reference=ref
        )
        losses[coef] = update([group])
    items = [
        {"prompt_ids": r.prompt_ids, "response_ids": r.response_ids, "routing": r.routing} for r in group
    ]
    batch = pack(items)
    with torch.no_grad():
        d = token_logp(ref[0], batch) - token_logp(chunks[0], batch)
    k3 = (torch.exp(d) - d - 1.0) * batch["mask"]
    return losses, float(k3.sum() / batch["mask"].sum())


def test_the_kl_term_matches_a_hand_computation(reference):
    losses, hand = run_distributed(kl_by_hand, 1, reference["weights"])[0]
    assert hand > 1e-4
    for m in losses.values():
        assert abs(m["policy/kl_ref"] - hand) <= 1e-6 * hand, (m["policy/kl_ref"], hand)
    # token-level mean over one microbatch: the loss moves by kl_coef x the mean k3 (up to the fp32
    # rounding of the loss itself, ~1e-7)
    diff = losses[0.5]["policy/loss"] - losses[0.0]["policy/loss"]
    assert abs(diff - 0.5 * hand) <= 1e-6 * max(1.0, abs(losses[0.0]["policy/loss"])), (diff, 0.5 * hand)


def stale_ratio_by_hand(rank, world_size, weights):
    """Rollouts sampled at version 0 with pi_old recorded as the async generator records it; then one
    real update (version 1) and the same rollouts again, now stale by one (GRPO, gradients only): the
    update's PPO ratio and staleness KL, and both computed here from the two versions' own forwards."""
    chunks, opt, sched = _build({}, weights, False)
    gens = Engine(chunks, eos_id=EOS).generate(
        _prompts(512)[:4], SamplingParams(max_new_tokens=NEW_TOKENS, seed=11), keys=[(i, 0) for i in range(4)]
    )
    group = [
        Rollout(g.prompt_ids, g.response_ids, g.logprobs, float(len(g.response_ids)), 0, 0, routing=g.routing)
        for g in gens
    ]
    record_old_logp(chunks[0].module, group, micro_batch_size=4)
    grpo = PolicyLossConfig("grpo")
    fresh = PolicyUpdate(chunks, None, None, grpo, micro_batch_size=4)([group])  # still version 0
    PolicyUpdate(chunks, opt, sched, grpo, micro_batch_size=4)([group])  # -> version 1
    stale = PolicyUpdate(chunks, None, None, grpo, micro_batch_size=4)([group])
    items = [
        {"prompt_ids": r.prompt_ids, "response_ids": r.response_ids, "routing": r.routing} for r in group
    ]
    batch = pack(items)
    old = torch.zeros_like(batch["mask"])
    for i, r in enumerate(group):
        p = len(r.prompt_ids)
        old[i, p - 1 : p - 1 + len(r.response_ids)] = torch.tensor(r.old_logp)
    with torch.no_grad():
        now = token_logp(chunks[0], batch)
    m = batch["mask"]
    ratio = float((torch.exp(now - old) * m).sum() / m.sum())
    kl = float(((old - now) * m).sum() / m.sum())
    return fresh, stale, ratio, kl


def test_a_stale_rollouts_ppo_ratio_is_to_its_sampling_version(reference):
    fresh, stale, ratio, kl = run_distributed(stale_ratio_by_hand, 1, reference["weights"])[0]
    # recorded pi_old = the trainer's forward at the sampling version: a fresh ratio of exactly 1
    assert abs(fresh["policy/ppo_ratio_mean"] - 1.0) <= 1e-6 and abs(fresh["policy/staleness_kl"]) <= 1e-7
    assert abs(ratio - 1.0) > 1e-3, ratio  # the update moved the policy on these tokens
    assert abs(stale["policy/ppo_ratio_mean"] - ratio) <= 1e-6 * ratio, (
        stale["policy/ppo_ratio_mean"],
        ratio,
    )
    assert abs(stale["policy/staleness_kl"] - kl) <= 1e-5 * abs(kl), (stale["policy/staleness_kl"], kl)
    # the engine mismatch is measured at the sampling version, not mixed with the staleness
    assert abs(stale["policy/mismatch_kl"] - fresh["policy/mismatch_kl"]) <= 1e-7


def test_keyed_sampling_depends_on_the_key_only():
    """The same key gives the same token whatever the batch around it; different keys decorrelate;
    the inverse-CDF draw follows the distribution (a chi-square check would catch an off-by-one)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    p = SamplingParams(seed=7, top_k=20)
    keys = [(1, 0, 5, 0), (2, 0, 5, 0), (1, 1, 5, 0), (1, 0, 6, 0)]
    tok, lp, _ = Engine._sample(logits, p, 7, keys)
    again, _, _ = Engine._sample(logits[[2, 0]], p, 7, [keys[2], keys[0]])
    assert again.tolist() == [tok[2].item(), tok[0].item()]
    other = [Engine._sample(logits, p, 8 + k, keys)[0].tolist() for k in range(5)]
    assert any(o != tok.tolist() for o in other)  # the seed matters
    u = keyed_uniforms(7, [(i,) for i in range(4000)])
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.02
    row = logits[:1].expand(4000, -1)
    drawn = Engine._sample(row, SamplingParams(seed=3), 3, [(i,) for i in range(4000)])[0]
    probs = torch.softmax(logits[0], -1)
    counts = Counter(drawn.tolist())
    chi2 = sum((counts.get(v, 0) - 4000 * float(probs[v])) ** 2 / (4000 * float(probs[v])) for v in range(50))
    assert chi2 < 100, chi2  # 49 degrees of freedom: the 0.9999 quantile is ~95
    assert all(float(probs[v]) > 0 for v in counts)


def test_top_k_and_top_p_never_draw_a_filtered_token():
    torch.manual_seed(1)
    logits = torch.randn(1, 30).expand(3000, -1)
    keys = [(i,) for i in range(3000)]
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    assert set(Engine._sample(logits, SamplingParams(top_k=5), 1, keys)[0].tolist()) <= top5
    drawn = set(Engine._sample(logits, SamplingParams(top_p=0.5), 1, keys)[0].tolist())
    probs, idx = torch.softmax(logits[0], -1).sort(descending=True)
    nucleus = set(idx[: int((probs.cumsum(0) - probs < 0.5).sum())].tolist())
    assert drawn <= nucleus and len(drawn) > 1


# -- held-out accuracy over uneven shards, and whole runs ---------------------------------------------
@dataclasses.dataclass(frozen=True)
class EvenLengthTask(ArithmeticTask):
    """The arithmetic prompts with a criterion a barely trained model meets about half the time (an
    even number of response characters): equal accuracies then say the responses were equal."""

    def correct(self, problem, response: str) -> bool:
        return len(response) % 2 == 0


def heldout_accuracy(rank, world_size, parallel_kw, weights, data_dir, run_dir):
    chunks, _, _ = _build(parallel_kw, weights, False)
    tok = run_tokenizer(DataConfig(tokenizer_vocab_size=512, data_dir=data_dir))
    rl = RLConfig(eval_problems=7, eval_samples=2, max_new_tokens=8, prompts_per_step=2)
    task = EvenLengthTask()
    engine = Engine(chunks[0].module, eos_id=tok.eos, pad_id=tok.pad)
    runner = RewardRunner(default_reward(0.0), workers=1)
    try:
        sampler = RolloutSampler(rl, task, tok, engine, runner, SEED, run_dir)
        return Evaluator(rl, task, sampler, engine, SEED).accuracy()
    finally:
        runner.close()


def test_heldout_accuracy_over_uneven_shards_equals_one_process_under_ep2(reference, embedded_data, tmp_path):
    """7 problems on 2 DP ranks (4 + 3, and the expert-parallel group spans them: the rank with 3
    keeps stepping), greedy and 2 keyed samples each."""
    w, d = reference["weights"], embedded_data
    (want,) = run_distributed(heldout_accuracy, 1, {}, w, d, str(tmp_path))
    got = run_distributed(heldout_accuracy, 2, {"ep": 2}, w, d, str(tmp_path))
    assert 0.0 < want[0] < 1.0 and 0.0 < want[1] < 1.0, want  # the criterion separates responses
    assert got[0] == got[1] == want


REWARD_ITEMS = [
    ("Q: What is 2 + 3?\nA:", "2 + 3 = 5. <answer>5</answer>", "2 + 3 = 5. <answer>5</answer>"),
    ("Q: What is 7 - 4?\nA:", "7 - 4 = 2. <answer>2</answer>", "7 - 4 = 3. <answer>3</answer>"),
    ("Q: What is 6 + 1?\nA:", "<answer>7</answer>", "6 + 1 = 7. <answer>7</answer>"),
    ("Q: What is 9 - 9?\nA:", "9 - 9 = 0. 0 = 0. 0 = 0. <answer>0</answer>", "9 - 9 = 0. <answer>0</answer>"),
    ("Q: What is 4 + 4?\nA:", "4 + 4 = 8.", "4 + 4 = 8. <answer>8</answer>"),
    ("Q: What is 5 - 2?\nA:", "5 - 2 = 3. <answer>3</answer>", "5 - 2 = 3. <answer>3</answer>"),
]


def reward_model_scores(rank, world_size, parallel_kw, path, data_dir, save):
    """The preference reward of REWARD_ITEMS (this DP rank's share) with a reward model saved by one
    process (`save`: a random backbone and a random head, so every response scores differently) and
    loaded in `parallel_kw`'s layout. Returns the scores of all ranks, rank-major."""
    parallel = ParallelConfig(**parallel_kw)
    platform.setup(parallel, seed=SEED)
    tok = run_tokenizer(DataConfig(tokenizer_vocab_size=512, data_dir=data_dir))
    if save:
        cfg = tiny()
        rm = RewardModel.from_backbone(build_step_flash(cfg, parallel), dataclasses.asdict(cfg))
        torch.nn.init.normal_(rm.head.weight, std=1.0)
        rm.save(path)
    pref = PreferenceReward(RewardModel.load(path, parallel), tok, length_penalty=0.05)
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    return _dp_gather(pref.score_batch(REWARD_ITEMS[r::dp]))


@pytest.mark.parametrize("kw", [{"tp": 2}, {"ep": 2}], ids=["tp2_sp", "ep2"])
def test_preference_reward_model_in_the_run_layout_scores_as_one_process(kw, embedded_data, tmp_path):
    """The reward model's backbone is resharded on load (Megatron-Core distributed checkpoint) to
    TP = 2 (sequence parallelism off for its forward) or EP = 2 (the two DP ranks score different
    batches through one all-to-all)."""
    path = str(tmp_path / "rm")
    (want,) = run_distributed(reward_model_scores, 1, {}, path, embedded_data, True)
    dp = 1 if "tp" in kw else 2
    want = [x for r in range(dp) for x in want[r::dp]]  # rank-major, as gathered
    got = run_distributed(reward_model_scores, 2, kw, path, embedded_data, False)
    assert got[0] == got[1]
    # responses equal to their reference score exactly 0.5; the others are all told apart
    assert len(set(round(x, 4) for x in want)) == len(want) - 1, want
    worst = max(abs(a - b) for a, b in zip(got[0], want))
    assert len(got[0]) == len(want) and worst <= 1e-5, (got[0], want)


def _torchrun(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *args]
    env = {**os.environ, **golden_runs.ENV, "PYTHONPATH": REPO}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow  # the default suite runs train_rl through torchrun under EP=2 (the test below)
def test_two_dp_ranks_reproduce_the_one_process_golden_rl_run(golden_run, tmp_path):
    """The golden sync RL run (tests/golden/runs.py: 6 MIS-PO steps from its warm-up checkpoint) on 2
    DP ranks through torchrun: every scalar matches the 1-process run."""
    work = golden_run("rl_sync")
    run = golden_runs.BY_NAME["rl_sync"]
    args = [a.format(work=work) for a in run.overrides if not a.startswith("train.run_dir")]
    _torchrun(["posttrain/train_rl.py", "--config", run.config, *args, f"train.run_dir={tmp_path}"])
    # mismatch_kl is KL(pi_rollout || pi_old) of one set of weights with itself: ~1e-8 of rounding
    # noise (another summation order) that a relative tolerance cannot judge; it gets an absolute one
    keys = [k for k in run.outputs["rl_sync"][1] if k != "policy/mismatch_kl"]
    got, want = (
        read_run(d, [*keys, "policy/mismatch_kl"]) for d in (str(tmp_path), os.path.join(work, "rl_sync"))
    )
    rows = compare(got, want, rtol=1e-4, keys=keys)
    bad = [r for r in rows if not r.ok]
    assert len(rows) >= 30 and not bad, format_rows(rows, ("dp2", "1 process"), only_bad=True)
    kl = [abs(a - b) for a, b in zip(got["policy/mismatch_kl"].values(), want["policy/mismatch_kl"].values())]
    assert len(kl) == 6 and max(kl) < 1e-6, kl


def fails_on_rank_one(prompt: str, response: str, reference: str) -> float:
    """A reward whose backend is down on rank 1 only (torchrun's RANK reaches the reward workers)."""
    if os.environ.get("RANK") == "1":
        raise RuntimeError("reward backend unreachable from rank 1")
    return 1.0 if reference in response else 0.0


def test_a_reward_failing_on_one_rank_only_completes_under_ep2(golden_run, tmp_path):
    """Rank 1's rewards all fail, so it has no rollout to train on while rank 0 has its share: it runs
    padding microbatches (the expert-parallel group spans both ranks) and the run completes."""
    work = golden_run("rl_sync")
    run = golden_runs.BY_NAME["rl_sync"]
    own = ("train.run_dir", "train.steps", "train.eval_interval")
    args = [a.format(work=work) for a in run.overrides if not a.startswith(own)]
    extra = ["parallel.ep=2", "train.steps=2", "train.eval_interval=0"]
    extra.append("rl.reward_fn=tests.rl.test_rl_layouts:fails_on_rank_one")
    _torchrun(["posttrain/train_rl.py", "--config", run.config, *args, *extra, f"train.run_dir={tmp_path}"])
    got = read_run(str(tmp_path), ["rl/reward_failed", "policy/padding_microbatches"])
    # per step: rank 1's 1 prompt x 4 samples fail, rank 0's 4 score (a count: summed over DP); rank 1
    # trains nothing and pads rank 0's one microbatch (cumulative, DP mean (2 + 0) / 2 after 2 steps)
    assert got["rl/reward_failed"] == {1: 4.0, 2: 4.0}, got
    assert got["policy/padding_microbatches"] == {1: 0.5, 2: 1.0}, got


def test_rl_stage_refuses_what_it_cannot_run_at_start():
    def load(*overrides):
        return load_run_config(
            os.path.join(REPO, "examples/rl/rl_tiny.yaml"), list(overrides), cls=RLRunConfig
        )

    with pytest.raises(ValueError, match="rl.async_mode=true"):
        train_rl(load("parallel.ep=2", "rl.async_mode=true"))
    with pytest.raises(ValueError, match="rl.async_mode=true with parallel {'pp': 2}"):
        train_rl(load("parallel.pp=2", "rl.async_mode=true"))
    with pytest.raises(ValueError, match="rl.reward_model='x' with parallel {'pp': 2}"):
        train_rl(load("parallel.pp=2", "rl.reward_model=x"))
    with pytest.raises(ValueError, match="advantage_rule=attention with parallel {'pp': 2}"):
        train_rl(load("parallel.pp=2", "rl.rollout=e3rl", "rl.e3rl.advantage_rule=attention"))


def buckets_vs_one_batch(rank, world_size):
    platform.setup(ParallelConfig(), seed=SEED)
    model = build_step_flash(_model_cfg(), ParallelConfig())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 512, (n,), generator=g).tolist() for n in (3, 40, 5, 44, 21)]
    out = {}
    for name, spread in (("one", math.inf), ("buckets", None)):
        engine = Engine(model, eos_id=EOS, prompt_spread=spread)
        runs = [
            engine.generate(prompts, SamplingParams(max_new_tokens=8, greedy=True)),
            engine.generate(prompts, SamplingParams(max_new_tokens=8, seed=5)),
        ]
        out[name] = {
            "tokens": [[x.response_ids for x in r] for r in runs],
            "routing": [[y.shape for y in x.routing] for x in runs[0]],
            "steps": engine.stats["decode_tokens"],
            "buckets": engine.buckets([len(p) for p in prompts], 8),
        }
    return out


def test_length_buckets_give_the_one_batch_rollouts_in_fewer_steps():
    """Prompts of 3-44 tokens, 8 new: buckets [3, 5], [21], [40, 44] (spread <= 8); greedy and keyed
    sampled tokens equal the one-batch engine's, in the callers' order, with far fewer row-steps."""
    (r,) = run_distributed(buckets_vs_one_batch, 1)
    assert r["buckets"]["buckets"] == [[0, 2], [4], [1, 3]]
    assert r["buckets"]["tokens"] == r["one"]["tokens"]
    assert r["buckets"]["routing"] == r["one"]["routing"]
    assert r["buckets"]["steps"] < r["one"]["steps"] / 2, (r["buckets"]["steps"], r["one"]["steps"])


@pytest.mark.parametrize("kw", [pytest.param({}, marks=pytest.mark.slow), {"ep": 2}], ids=["dp2", "ep2"])
def test_macro_in_the_layer_wise_optimizer_updates_as_one_process(kw, reference, tmp_path):
    """One RL update with MACRO (Frobenius sphere; whole matrices per DP rank in Megatron-Core's
    LayerWiseDistributedOptimizer, expert matrices in the expert-parallel groups) equals one process."""
    want = reference["macro"]["res"]
    got = run_distributed(rollouts_and_update, 2, kw, reference["weights"], str(tmp_path), False, "macro")[0]
    _same_rollouts(got, want, "sampled")
    # update_rtol 3e-4: the EP2 router update measured 1.2e-4 from the reference on one of our CPU
    # machines (4e-5 on another): MACRO's step divides by the gradient's norm, and the router's
    # gradient sums expert outputs in another order under the all-to-all; a wrong gradient is O(1)
    _same_weights(reference, "macro", str(tmp_path), update_rtol=3e-4)


def uneven_work(rank, world_size, parallel_kw, weights):
    """Rank 0 holds every prompt (two length buckets), rank 1 none: rank 1 must step with it through
    placeholder chunks (plain) and a placeholder bucket (E3RL)."""
    chunks, _, _ = _build(parallel_kw, weights, False)
    engine = Engine(chunks[0].module, eos_id=EOS)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(4, 512, (n,), generator=g).tolist() for n in (3, 30, 4)]
    mine = prompts if ps.get_data_parallel_rank() == 0 else []
    keys = [(i, 0) for i in range(len(mine))]
    plain = engine.generate(mine, SamplingParams(max_new_tokens=6, seed=3), keys=keys)
    ecfg = E3RLConfig(segment_len=3, num_segments=2, threshold_std=0.0, max_erasures=1)
    erased = generate_erasable(
        engine, mine, [i for i, _ in keys], SamplingParams(seed=3), E3RLPolicy(ecfg), keys=keys
    )
    return [
        [x.response_ids for x in plain],
        [x.response_ids for x in erased],
        len(engine.buckets([3, 30, 4], 6)),
    ]


def test_a_rank_without_prompts_keeps_stepping_under_ep2(reference):
    (want,) = run_distributed(uneven_work, 1, {}, reference["weights"])
    got = run_distributed(uneven_work, 2, {"ep": 2}, reference["weights"])
    assert want[2] == 2  # two buckets on rank 0, none on rank 1
    assert got[0] == want and got[1][:2] == [[], []]
