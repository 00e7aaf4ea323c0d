"""MACRO inside Megatron-Core's optimizer factory and its layer-wise distributed optimizer, on
CPU/gloo: after 3 steps of the tiny Step 3.5 Flash preset (MoE, MTP, every feature on), DP=2
(layer-wise: each rank steps whole matrices), TP=2 (sequence parallel; matrices gathered along their
partition dim) and EP=2 give the same loss curve and the same weights as 1 process, per manifold."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from megatron_step import platform
from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.models.step_flash import freeze_norm_gains as freeze
from megatron_step.optim.config import OptimConfig
from megatron_step.optim.factory import build_optimizer, leaf_optimizers, matrix_predicate, tag_routers
from megatron_step.platform import ParallelConfig
from megatron_step.testing import run_distributed
from megatron_step.testing.parity import compare_steps, global_batch, layout_step, make_step_reference
from megatron_step.training.step import wrap_ddp

pytestmark = pytest.mark.distributed

CFG = tiny()
BUILD = partial(build_step_flash, CFG)
DATA = global_batch(CFG.vocab_size, 32)
STEPS = 3
# fp32; the worst tensors are AdamW's norm gains (tiny gradients, Adam's normalisation amplifies
# reduction-order noise): ~8e-6 measured, MACRO's matrices ~5e-6
RTOL = 2e-5


# spectral and oblique differ from frobenius only in their TP reductions: `slow` (make test-all), to
# keep the default suite's time on a 2-core CI box well under its budget
@pytest.fixture(
    scope="module",
    params=[
        "frobenius",
        pytest.param("spectral", marks=pytest.mark.slow),
        pytest.param("oblique", marks=pytest.mark.slow),
    ],
)
def reference(request, tmp_path_factory):
    optim = dict(optimizer="macro", lr=0.01, warmup_steps=0, manifold=request.param)
    return make_step_reference(BUILD, optim, DATA, str(tmp_path_factory.mktemp("ref")), STEPS)


def _layouts(manifold):
    if manifold == "frobenius":  # DP = 2 (the layer-wise optimizer's sharding alone) under EP's DP group
        return [{"tp": 2}, {"ep": 2}]
    return [{"tp": 2}]  # the path where the manifold's own reductions (norms, power iteration) are gathered


def test_two_rank_layouts_match_one_process(reference, tmp_path):
    for i, layout in enumerate(_layouts(reference["optim"]["manifold"])):
        out = compare_steps(BUILD, layout, DATA, reference, str(tmp_path / str(i)), rtol=RTOL)
        assert out["moved"] > 200  # every matrix and gain moved


def test_macro_owns_the_matrices_and_adamw_the_rest():
    out = run_distributed(optimizer_layout, 1, {"optimizer": "macro", "scalar_lr": 1e-3})[0]
    owner = out["owner"]
    assert out["chain"] == ["LayerWiseFP32", "DistributedOptimizer"]
    for name, opt in owner.items():
        matrix = name.endswith(
            ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
        )
        matrix = matrix or name.endswith(("head_gate.weight", "eh_proj.weight"))
        assert opt == ("MACRO" if matrix else "AdamW"), (name, opt)
        assert out["max_lr"][name] == (3e-3 if matrix else 1e-3), name  # optim.scalar_lr for AdamW
    assert owner["decoder.layers.2.mlp.router.weight"] == "AdamW"
    assert owner["embedding.word_embeddings.weight"] == "AdamW"


def test_frozen_norm_gains_stay_put():
    out = run_distributed(optimizer_layout, 1, {"optimizer": "macro", "weight_decay": 0.0}, True)[0]
    frozen = set(out["frozen"])
    assert len(frozen) > 50 and not frozen & set(out["owner"])  # in no optimizer
    assert not frozen & out["moved"]
    assert any("linear_qkv" in n for n in out["moved"])


# ---------------------------------------------------------------------------------------------
# process bodies (module-level so they pickle into spawned ranks)
# ---------------------------------------------------------------------------------------------
def optimizer_layout(rank, world_size, optim_kw, freeze_norm_gains=False):
    """Which optimizer owns which parameter, for `OptimConfig(**optim_kw)` on the tiny preset; and
    whether frozen norm gains stay put over two steps."""
    platform.setup(ParallelConfig(), seed=5)
    o = OptimConfig(**optim_kw)
    cfg = tiny()
    model = build_step_flash(cfg, ParallelConfig())
    tag_routers(model, o.routers_to_adam)
    frozen = freeze(model) if freeze_norm_gains else []
    ddp = wrap_ddp(model, o.use_distributed_optimizer, layer_wise_params=matrix_predicate(o))
    opt = build_optimizer(o, [ddp], bf16=False)
    names = {id(p): n for n, p in model.named_parameters()}
    owner, lrs = {}, {}
    for leaf in leaf_optimizers(opt):
        inner = leaf.optimizer
        # a DistributedOptimizer's torch optimizer holds shard copies; its model params are listed
        # per group in model_fp32_groups (fp32 runs)
        groups = getattr(leaf, "model_fp32_groups", None) or [g["params"] for g in inner.param_groups]
        for group, params in zip(inner.param_groups, groups):
            for p in params:
                owner[names[id(p)]] = type(inner).__name__
                lrs[names[id(p)]] = group["max_lr"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = global_batch(cfg.vocab_size, 32)
    for _ in range(2):
        layout_step(ddp, data, opt)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    chain = [type(c).__name__ for c in getattr(opt, "chained_optimizers", [])]
    return {"owner": owner, "max_lr": lrs, "moved": moved, "frozen": frozen, "chain": chain}
