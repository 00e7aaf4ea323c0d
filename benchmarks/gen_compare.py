"""Generation throughput: our colocated engine (megatron_step/rl/engine.py, Megatron-Core's static KV
cache) vs `transformers`' `generate()` on the same weights (converted in memory with the conversion
tool's mapping, megatron_step/models/step_flash/hf.py), greedy, same prompts, same number of new tokens.

    python -m benchmarks.gen_compare                 # tiny preset, batch 16 x 16 + 48

transformers has no text-only causal-LM class for this model (`Step3p7TextModel` is the backbone),
so `_HFStepForCausalLM` adds the untied LM head and `GenerationMixin`: `generate()`, its DynamicCache
(sliding-window layers included) and its greedy loop are transformers' own. Both sides run in one
process at the same thread count, alternating runs; the greedy tokens are checked to be identical
(same weights, same argmax) before any time is reported. MoE routing is not recorded on our side
(`record_routing=False`), as transformers has no such output.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import torch

from megatron_step import platform
from megatron_step.models.step_flash import build_step_flash, tiny
from megatron_step.models.step_flash.hf import mcore_to_hf_native
from megatron_step.models.step_flash.hf_config import hf_text_config
from megatron_step.platform import ParallelConfig
from megatron_step.rl.engine import Engine, SamplingParams
from megatron_step.testing import run_distributed


def _hf_causal_lm(hf_cfg, state: dict, head: torch.Tensor):
    from transformers import GenerationMixin
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.models.step3p7.modeling_step3p7 import Step3p7PreTrainedModel, Step3p7TextModel

    class _HFStepForCausalLM(Step3p7PreTrainedModel, GenerationMixin):
        config_class = type(hf_cfg)

        def __init__(self, config):
            super().__init__(config)
            self.model = Step3p7TextModel(config)
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=None, **kwargs):  # fmt: skip
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
            )
            return CausalLMOutputWithPast(
                logits=self.lm_head(out.last_hidden_state), past_key_values=out.past_key_values
            )

    model = _HFStepForCausalLM(hf_cfg).eval()
    missing, unexpected = model.model.load_state_dict(state, strict=False)
    if [k for k in missing if "rotary" not in k] or unexpected:
        raise RuntimeError(f"weights did not map: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        model.lm_head.weight.copy_(head)
    return model


def compare(
    batch: int = 16, prompt_len: int = 16, new_tokens: int = 48, runs: int = 3, threads: int | None = None
):
    """Median tokens/s of both sides and their ratio; raises if the greedy tokens differ."""
    logging.getLogger("megatron").setLevel(logging.ERROR)

    cfg = tiny()
    platform.setup(ParallelConfig(), seed=5)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    ours = build_step_flash(cfg, ParallelConfig()).eval()
    state = {k: v for k, v in ours.state_dict().items() if "_extra_state" not in k}
    hf_state = mcore_to_hf_native(state, cfg)
    head = hf_state.pop("lm_head.weight")
    hf = _hf_causal_lm(hf_text_config(cfg), hf_state, head)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, cfg.vocab_size, (batch, prompt_len), generator=g)
    # no stop token can end a sequence early on either side: eos is outside the sampled range
    engine = Engine(ours, eos_id=-1)
    params = SamplingParams(max_new_tokens=new_tokens, greedy=True)

    def run_ours():
        gens = engine.generate(prompts.tolist(), params, record_routing=False)
        return torch.tensor([x.response_ids for x in gens])

    def run_hf():
        with torch.no_grad():
            out = hf.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, prompt_len:]

    a, b = run_ours(), run_hf()  # warm-up + the correctness check
    same = torch.equal(a, b)
    agree = (a == b).float().mean().item()
    times = {"ours": [], "transformers": []}
    for _ in range(runs):
        for name, fn in (("ours", run_ours), ("transformers", run_hf)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tok = batch * new_tokens
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "identical_greedy_tokens": same,
        "token_agreement": agree,
        "ours_tok_s": tok / med["ours"],
        "hf_tok_s": tok / med["transformers"],
        "ratio": med["transformers"] / med["ours"],
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
    }


def format_table(r: dict) -> str:
    return "\n".join(
        [
            f"greedy generation, tiny preset, batch {r['batch']} x ({r['prompt_len']} prompt + "
            f"{r['new_tokens']} new) tokens, {r['threads']} threads; identical tokens: "
            f"{r['identical_greedy_tokens']} ({r['token_agreement']:.1%} agree)",
            f"{'engine':<34} {'new tokens/s':>12}",
            f"{'ours (Megatron-Core static cache)':<34} {r['ours_tok_s']:12.1f}",
            f"{'transformers generate()':<34} {r['hf_tok_s']:12.1f}",
            f"ratio ours / transformers: {r['ratio']:.2f}x",
        ]
    )


def body(rank, world_size, kw):
    return compare(**kw)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)

    kw = dict(batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens, runs=args.runs)
    print(format_table(run_distributed(body, 1, kw)[0]))


if __name__ == "__main__":
    main()
