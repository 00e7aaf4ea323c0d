"""The one trainer step and the one data-parallel mean (megatron_step.training.step)."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state as ps

from megatron_step import platform
from megatron_step.models.gpt_local import LocalGPTConfig, build_local_gpt
from megatron_step.optim.config import OptimConfig
from megatron_step.optim.factory import build_optimizer
from megatron_step.platform import ParallelConfig
from megatron_step.testing import run_distributed
from megatron_step.training.setup import build_scheduler
from megatron_step.training.step import dp_mean, from_last_stage, train_step, wrap_ddp

pytestmark = pytest.mark.distributed


def test_dp_mean_averages_per_key_over_the_ranks_that_report_it():
    a, b = run_distributed(reduce_metrics, 2, {})
    assert a == b
    assert a["x"] == pytest.approx(1.5)  # (1 + 2) / 2
    assert a["only_rank1"] == pytest.approx(7.0)  # one rank reports it: its value, not 7 / 2
    assert a["staleness/max"] == 5.0  # max_keys: the maximum, not the mean 3.0


def test_from_last_stage_gives_every_stage_the_last_stage_metrics():
    first, last = run_distributed(reduce_metrics, 2, {"pp": 2})
    assert first["last"] == last["last"] == {"loss": 1.0}  # only the last stage had it


def test_train_step_steps_the_schedule_only_for_applied_updates():
    applied, skipped = run_distributed(skip_contract, 1)[0]
    assert applied["ok"] and applied["lr_moved"] and applied["weights_moved"]
    assert not skipped["ok"] and not skipped["lr_moved"] and not skipped["weights_moved"]
    assert applied["grad_norm"] > 0 and applied["metrics"] == 2  # one dict per microbatch


# ---------------------------------------------------------------------------------------------------
# process bodies (module-level so they pickle into spawned ranks)
# ---------------------------------------------------------------------------------------------------
def reduce_metrics(rank, world_size, parallel_kw):
    platform.setup(ParallelConfig(**parallel_kw), seed=0)
    if parallel_kw.get("pp"):
        last = {"loss": 1.0} if ps.is_pipeline_last_stage() else {}
        return {"last": from_last_stage(last)}
    mine = {"x": 1.0 + rank, "staleness/max": [5.0, 1.0][rank]}
    if rank == 1:
        mine["only_rank1"] = 7.0
    return dp_mean(mine, max_keys=("staleness/max",))


class _Skipping:
    """The real optimizer, but every step reports the update as skipped (what Megatron-Core's
    mixed-precision optimizer does on inf/nan gradients under a loss scaler) without applying it."""

    def __init__(self, inner):
        self.inner = inner
        self.param_groups = inner.param_groups

    def zero_grad(self):
        self.inner.zero_grad()

    def step(self):
        return False, None, None


def skip_contract(rank, world_size):
    platform.setup(ParallelConfig(), seed=0)
    cfg = LocalGPTConfig()
    out = []
    for skip in (False, True):
        model = wrap_ddp(build_local_gpt(cfg, ParallelConfig()))
        o = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0)  # lr > 0 from the first step
        opt = build_optimizer(o, [model], bf16=False)
        sched = build_scheduler(opt, o, steps=10)
        lr0 = opt.param_groups[0]["lr"]
        before = [p.detach().clone() for p in model.module.parameters()]
        data = torch.randint(
            0, cfg.vocab_size, (2, cfg.seq_length + 1), generator=torch.Generator().manual_seed(1)
        )
        micro = [(row[None, :-1], row[None, 1:]) for row in data]
        r = train_step(
            [model],
            _Skipping(opt) if skip else opt,
            sched,
            micro,
            seq_length=cfg.seq_length,
            micro_batch_size=1,
        )
        moved = any(not torch.equal(p.detach(), b) for p, b in zip(model.module.parameters(), before))
        out.append(
            {
                "ok": r.update_successful,
                "lr_moved": opt.param_groups[0]["lr"] != lr0,
                "weights_moved": moved,
                "grad_norm": r.grad_norm or 0.0,
                "metrics": len(r.metrics),
            }
        )
    return out
