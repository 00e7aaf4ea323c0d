"""Non-finite steps (megatron_step.training.step): a NaN injected into one rank's gradients or into the
loss skips the optimizer step on every rank -- weights, optimizer state and LR schedule unchanged --
and is counted; the next step trains; `train.max_skipped_steps` skipped steps in a row stop a
pretraining run with the last checkpoint intact."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_step import platform
from megatron_step.config.run import PretrainConfig, load_run_config
from megatron_step.models.step_flash import tiny
from megatron_step.optim.config import OptimConfig
from megatron_step.optim.factory import leaf_optimizers
from megatron_step.platform import ParallelConfig
from megatron_step.stages.pretrain import pretrain
from megatron_step.testing import run_distributed
from megatron_step.testing.golden import read_run
from megatron_step.training import checkpoint
from megatron_step.training.setup import build_model_and_optimizer
from megatron_step.training.step import SkipGuard, train_step

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = "MEGATRON_STEP_INJECT_NAN"


def _state(chunks, opt) -> dict[str, torch.Tensor]:
    out = {f"w.{k}": v.detach().clone() for k, v in chunks[0].module.named_parameters()}
    # buffers too: the routers' aux-loss-free expert bias moves at every update
    out.update({f"b.{k}": v.detach().clone() for k, v in chunks[0].module.named_buffers()})
    assert any(k.endswith("expert_bias") for k in out), sorted(out)[:5]
    for j, leaf in enumerate(leaf_optimizers(opt)):
        for i, st in enumerate(leaf.optimizer.state.values()):
            for k, v in st.items():
                if torch.is_tensor(v):
                    out[f"opt.{j}.{i}.{k}"] = v.detach().clone()
    return out


def _steps(rank, world_size, n_steps: int):
    """`n_steps` train_step calls on a tiny model (the test sets which ones get a fault); per call:
    (update applied, state unchanged by it, lr)."""
    parallel = ParallelConfig()
    platform.setup(parallel, seed=11)
    model = tiny()
    chunks, opt, sched = build_model_and_optimizer(model, parallel, OptimConfig(lr=1e-3, warmup_steps=2), 10)
    g = torch.Generator().manual_seed(3 + rank)
    tokens = torch.randint(4, model.vocab_size, (2, 33), generator=g)
    batch = [{"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}]
    guard = SkipGuard(0)
    out = []
    for _ in range(n_steps):
        before = _state(chunks, opt)
        r = train_step(chunks, opt, sched, batch, seq_length=32, micro_batch_size=2, guard=guard)
        after = _state(chunks, opt)
        unchanged = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        out.append((r.update_successful, unchanged, opt.param_groups[0]["lr"]))
    weights = torch.cat([p.detach().flatten() for p in chunks[0].module.parameters()])
    return {"steps": out, "skipped": guard.total, "weights": weights}


@pytest.mark.parametrize("kind", ["grad", "loss"])
def test_a_non_finite_step_is_skipped_and_counted_and_training_goes_on(kind, monkeypatch):
    monkeypatch.setenv(ENV, f"{kind}:2")
    (out,) = run_distributed(_steps, 1, 3)
    (ok1, same1, lr1), (ok2, same2, lr2), (ok3, same3, lr3) = out["steps"]
    assert ok1 and not same1  # a normal step trains
    assert not ok2 and same2 and lr2 == lr1  # the faulty one: nothing moved, the schedule waited
    assert ok3 and not same3 and lr3 > lr2  # training goes on (warm-up: the lr rises again)
    assert out["skipped"] == 1


def test_a_nan_on_one_rank_skips_the_step_on_both(monkeypatch):
    """DP=2, the NaN in rank 0's gradients only: rank 1 skips the step too, the replicas stay equal."""
    monkeypatch.setenv(ENV, "grad:2")
    a, b = run_distributed(_steps, 2, 3)
    assert (
        [s[:2] for s in a["steps"]]
        == [s[:2] for s in b["steps"]]
        == [(True, False), (False, True), (True, False)]
    )
    assert torch.equal(a["weights"], b["weights"])


def test_skip_guard_stops_after_the_limit_in_a_row():
    guard = SkipGuard(3, "pretraining")
    for ok in (False, False, True, False, False):
        guard.record(ok)
    with pytest.raises(
        FloatingPointError, match=r"pretraining: 3 optimizer steps in a row skipped .*max_skipped_steps=3"
    ):
        guard.record(False)
    assert guard.total == 5


def _pretrain(rank, world_size, data_dir, run_dir):
    overrides = [
        f"data.data_dir={data_dir}",
        "model.vocab_size=512",
        "data.tokenizer_vocab_size=512",
        "train.steps=8",
        "train.save_interval=1",
        "train.eval_interval=0",
        "train.log_interval=1",
        f"train.run_dir={run_dir}",
    ]
    cfg = load_run_config(os.path.join(REPO, "examples/tiny/tiny.yaml"), overrides, PretrainConfig)
    try:
        return pretrain(cfg)
    except FloatingPointError as e:
        return str(e)


def test_pretraining_stops_after_max_skipped_steps_in_a_row(embedded_data, tmp_path, monkeypatch):
    """Steps 3, 4 and 5 get a NaN loss: 3 and 4 are skipped and logged, the third in a row stops the
    run with its message; the checkpoint of step 4 (the last save) is intact and loads."""
    monkeypatch.setenv(ENV, "loss:3,4,5")
    run_dir = str(tmp_path / "run")
    msg = run_distributed(_pretrain, 1, embedded_data, run_dir)[0]
    assert isinstance(msg, str) and "3 optimizer steps in a row skipped" in msg, msg
    skipped = read_run(run_dir, ["train/skipped_iterations"])["train/skipped_iterations"]
    assert skipped == {1: 0.0, 2: 0.0, 3: 1.0, 4: 2.0}, skipped
    assert checkpoint.resolve_latest(run_dir) == 4
