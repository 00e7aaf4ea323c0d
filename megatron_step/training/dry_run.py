"""`--dry-run`: check a run's layout against a world size and estimate per-GPU memory, without GPUs.

Parameter counts per layer come from the real model built on the meta device (1 process); they are
then distributed as Megatron-Core would: decoder layers over pipeline (virtual) stages, dense
weights / TP, expert weights / (EP x ETP), embedding on the first stage, LM head + MTP on the last.

Memory model per GPU (bf16 training, fp32 grad reduction, distributed optimizer = ZeRO-1):
  weights 2 B/param + main grads 4 B/param + optimizer 12 B/param / (data-parallel size)
  (fp32 master + Adam m, v; expert weights shard over the expert-data-parallel size).
  activations: 34 * s * b * h / tp bytes per layer and microbatch (flash attention, no recompute,
  sequence parallel; Korthikanti et al. 2022) plus the routed tokens of MoE layers
  (top-k * s * b * 3 * moe_ffn * 2 B / ep), times the microbatches in flight on the first stage
  under 1F1B (= pp). A rough upper-side estimate, not a measurement.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import defaultdict

import torch
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

from megatron_step import platform
from megatron_step.models.step_flash import StepFlashConfig, build_step_flash
from megatron_step.platform import ParallelConfig
from megatron_step.training.config import TrainConfig

GiB = 1024**3


def _per_layer_params(cfg) -> tuple[dict, dict, int, int, list[int]]:
    """(dense params by layer, expert params by layer, embedding, head, MTP modules) of the full model."""
    platform.setup(ParallelConfig(), seed=0)
    with torch.device("meta"):
        model = build_step_flash(cfg, ParallelConfig(), use_te=False, initialize=False)
    dense, expert = defaultdict(int), defaultdict(int)
    emb = head = 0
    mtp = defaultdict(int)
    for name, p in model.named_parameters():
        if m := re.match(r"decoder\.layers\.(\d+)\.", name):
            (expert if ".mlp.experts." in name else dense)[int(m.group(1))] += p.numel()
        elif m := re.match(r"mtp\.layers\.(\d+)\.", name):
            mtp[int(m.group(1))] += p.numel()
        elif name.startswith("embedding."):
            emb += p.numel()
        elif name.startswith("output_layer."):
            head += p.numel()
        else:  # final norm
            dense[cfg.num_layers - 1] += p.numel()
    platform.teardown()
    return dense, expert, emb, head, [mtp[k] for k in sorted(mtp)]


def _stages(parallel, num_layers: int) -> dict[tuple[int, int], list[int]]:
    """(pp_rank, vpp_rank) -> global decoder layer ids."""
    pp, vpp = parallel.pp, parallel.vpp or 1
    out = {(r, v): [] for r in range(pp) for v in range(vpp)}
    if parallel.pipeline_layout:
        layout = PipelineParallelLayerLayout(parallel.pipeline_layout, pp).layout
        nxt = 0
        for v in range(vpp):
            for r in range(pp):
                for t in layout[r][v]:
                    if t == LayerType.decoder:
                        out[(r, v)].append(nxt)
                        nxt += 1
        return out
    per = num_layers // (pp * vpp)
    for v in range(vpp):
        for r in range(pp):
            s = v * pp + r
            out[(r, v)] = list(range(s * per, (s + 1) * per))
    return out


def memory_estimate(
    m: StepFlashConfig, p: ParallelConfig, t: TrainConfig, seq_length: int, world_size: int
) -> dict:
    """Per pipeline rank: parameters, weights / grads / optimizer / activation GiB (module docstring).
    The layout must have been validated (megatron_step.stages.pretrain.dry_run does)."""
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    dense, expert, emb, head, mtp = _per_layer_params(m)
    stages = _stages(p, m.num_layers)
    dp, edp = p.dp(world_size), p.expert_dp(world_size)
    seq, mbs, h = seq_length, t.micro_batch_size, m.hidden_size
    n_micro = t.global_batch_size // (mbs * dp)
    act_dense = 34 * seq * mbs * h / p.tp
    act_moe = m.moe_topk * seq * mbs * 3 * m.moe_ffn_hidden_size * 2 / p.ep
    rows = []
    for r in range(p.pp):
        layers = [i for v in range(p.vpp or 1) for i in stages[(r, v)]]
        d = sum(dense[i] for i in layers) / p.tp
        e = sum(expert[i] for i in layers) / (p.ep * p.etp)
        if r == 0:
            d += emb / p.tp
        if r == p.pp - 1:
            d += (head + sum(mtp)) / p.tp
        params = d + e
        weights = 2 * params
        grads = 4 * params
        optim = 12 * d / dp + 12 * e / edp
        n_mtp = len(mtp) if r == p.pp - 1 else 0
        per_mb = sum(act_dense + (act_moe if m.is_moe(i) else 0) for i in layers) + n_mtp * act_dense
        acts = per_mb * min(p.pp - r, n_micro)  # 1F1B: stage r holds pp - r microbatches
        rows.append(
            {
                "pp_rank": r,
                "layers": len(layers),
                "params": params,
                "weights_gib": weights / GiB,
                "grads_gib": grads / GiB,
                "optimizer_gib": optim / GiB,
                "activations_gib": acts / GiB,
                "total_gib": (weights + grads + optim + acts) / GiB,
            }
        )
    return {"layout": p.describe(world_size), "microbatches": n_micro, "rows": rows}


def format_report(result: dict) -> str:
    lines = [
        f"layout: {result['layout']}, {result['microbatches']} microbatches per step",
        f"{'pp':>3} {'layers':>6} {'params/GPU':>11} {'weights':>8} {'grads':>8} {'optim':>8} "
        f"{'acts':>8} {'total GiB':>10}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['pp_rank']:>3} {r['layers']:>6} {r['params'] / 1e9:10.2f}B {r['weights_gib']:8.1f} "
            f"{r['grads_gib']:8.1f} {r['optimizer_gib']:8.1f} {r['activations_gib']:8.1f} "
            f"{r['total_gib']:10.1f}"
        )
    worst = max(result["rows"], key=lambda r: r["total_gib"])
    lines.append(
        f"peak per GPU: {worst['total_gib']:.1f} GiB on pipeline rank {worst['pp_rank']} "
        "(rough estimate; see megatron_step/training/dry_run.py for the model)"
    )
    return "\n".join(lines)
