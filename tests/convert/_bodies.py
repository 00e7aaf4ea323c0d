"""Process bodies for the conversion tests."""

from __future__ import annotations

import torch

from megatron_step import platform
from megatron_step.config import ParallelConfig
from megatron_step.models.step_flash import build_step_flash, tiny


def logits_vs_transformers(rank, ws, seq: int):
    """Our tiny model's logits vs transformers' Step3p7TextModel loaded with the exported weights."""
    from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

    from megatron_step.convert.step_hf import hf_text_config, mcore_to_hf_native

    cfg = tiny()
    platform.setup(ParallelConfig(), seed=5)
    ours = build_step_flash(cfg, ParallelConfig()).eval()
    with torch.no_grad():  # non-trivial norm weights and expert biases, so their mapping is tested
        for n, p in ours.named_parameters():
            if "layernorm" in n or n.endswith("norm.weight"):
                p.normal_(0, 0.1)
        for mod in ours.modules():
            if hasattr(mod, "expert_bias") and mod.expert_bias is not None:
                mod.expert_bias.normal_(0, 0.05)
    state = {k: v for k, v in ours.state_dict().items() if "_extra_state" not in k}
    hf_state = mcore_to_hf_native(state, cfg)
    head = hf_state.pop("lm_head.weight")
    hf = Step3p7TextModel(hf_text_config(cfg)).eval()
    result = hf.load_state_dict(hf_state, strict=False)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, cfg.vocab_size, (2, seq), generator=g)
    pos = torch.arange(seq).unsqueeze(0).expand(2, seq)
    with torch.no_grad():
        a = ours(tok, pos, None)  # (B, S, V) logits
        b = hf(input_ids=tok).last_hidden_state @ head.T
    return {
        "missing": list(result.missing_keys),
        "unexpected": list(result.unexpected_keys),
        "max_abs_diff": (a.float() - b.float()).abs().max().item(),
        "scale": a.abs().max().item(),
    }
