"""Generate text from a checkpoint: a Megatron run directory (its newest checkpoint, in the run
config's layout) or a Hugging Face directory (config.json + safetensors, either dialect; its own
tokenizer when it has tokenizer.json), with the RL engine (KV cache, keyed sampling).

    from megatron_step.stages.generate import load_policy, complete
    policy = load_policy(cfg, "runs/sft_tiny")            # or "runs/sft_tiny_hf" (an export)
    outs = complete(policy, [[{"role": "user", "content": "What is 2 + 3?"}]], params, chat=True)
    outs[0]["text"], outs[0]["ids"], outs[0]["finish"]

A prompt is text or chat messages. Messages (and text with `chat=True`) are rendered with the chat
template (`rl.data.chat_template`, else the tokenizer's own, else the embedded ChatML) and its
generation prompt, as `transformers`' `apply_chat_template(..., add_generation_prompt=True)` does;
generation then stops at the end-of-turn token (`rl.data.stop`) as at eos. The ids are the
tokenizer's bos (unless the template wrote it) + the rendered text.

Sample j of prompt i draws with key (i, j) and the given seed: the same call gives the same text under
any layout. `on_text((i, j), piece)` streams: it gets each new piece of sample j of prompt i as it is
decoded (the samples are then generated one at a time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

from megatron_step.data.chat import ChatTemplate, check_messages
from megatron_step.data.pipeline import run_tokenizer
from megatron_step.data.tokenizer import load_tokenizer
from megatron_step.models.step_flash import build_step_flash, hf_config
from megatron_step.rl.engine import Engine, SamplingParams
from megatron_step.rl.policy import build_reference
from megatron_step.training import checkpoint

__all__ = ["Policy", "complete", "is_hf_dir", "load_policy"]


@dataclass
class Policy:
    chunks: list  # frozen model chunks in the run's layout
    tokenizer: object
    model_config: object
    source: str  # what was loaded, for messages: "<run dir> (step N)" or "<hf dir> (HF, dialect)"


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        f.endswith(".safetensors") for f in os.listdir(path)
    )


def _load_hf(cfg, path: str) -> Policy:
    from megatron_step.convert.hf_checkpoint import HFReader  # reads safetensors; only needed here

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            f"{path}: a Hugging Face directory loads in one process; for a parallel layout convert it "
            "first (tools/convert_checkpoint.py hf2mcore) and give the run directory"
        )
    model_cfg = hf_config.config_from_hf_dir(path)
    reader = HFReader(path)
    if reader.dialect == "native" and model_cfg.mtp_num_layers:  # transformers-native files carry no MTP
        model_cfg = model_cfg.replace(mtp_num_layers=0, mtp_loss_weights=[])
    model = build_step_flash(model_cfg, cfg.parallel)
    model.requires_grad_(False)
    state = dict(reader.megatron_tensors(model_cfg))
    own = model.state_dict()
    for key, t in state.items():
        if key not in own:
            raise KeyError(f"{path}: {key} is not in the model its config.json describes")
        state[key] = t.to(own[key].dtype)
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise KeyError(f"{path}: no tensors for {missing[:5]}")
    has_tok = os.path.isfile(os.path.join(path, "tokenizer.json"))
    tokenizer = load_tokenizer(path) if has_tok else run_tokenizer(cfg.data)
    return Policy([model], tokenizer, model_cfg, f"{path} (HF, {reader.dialect} dialect)")


def load_policy(cfg, source: str) -> Policy:
    """The model and tokenizer of `source` (a run directory with checkpoints/, or an HF directory).
    Call after megatron_step.platform.setup(cfg.parallel, ...)."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source}: not a directory (a run directory or a Hugging Face directory)")
    if is_hf_dir(source):
        return _load_hf(cfg, source)
    step = checkpoint.latest_step(source)
    if step is None:
        raise FileNotFoundError(
            f"{source}: neither a run directory with checkpoints/ nor a Hugging Face directory "
            "(config.json + *.safetensors)"
        )
    model_cfg = cfg.model_config()
    chunks = build_reference(model_cfg, cfg.parallel, source)  # frozen, newest checkpoint
    return Policy(chunks, run_tokenizer(cfg.data), model_cfg, f"{source} (step {step})")


def prompt_ids(policy: Policy, template: ChatTemplate, prompt, chat: bool) -> list[int]:
    """The ids the model reads for `prompt` (text, or a list of chat messages)."""
    tok = policy.tokenizer
    if isinstance(prompt, list):
        text = template.render(check_messages(prompt, need_assistant=False), add_generation_prompt=True)
    elif chat:
        text = template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        text = prompt
    return tok.with_bos(tok.encode(text))


def stop_ids(tokenizer, stop_text: str) -> tuple[int, ...]:
    """The end-of-turn token of chat generation: `stop_text`'s one id, none when the tokenizer does not
    have it as one token."""
    if not stop_text:
        return ()
    got = tokenizer.encode(stop_text)
    return tuple(got) if len(got) == 1 else ()


def complete(
    policy: Policy,
    prompts: list,
    params: SamplingParams,
    chat: bool = False,
    chat_template: str | None = None,
    stop_text: str = "<|im_end|>",
    n: int = 1,
    on_text=None,
) -> list[dict]:
    """`n` completions of each prompt (in order: prompt 0's n, prompt 1's n, ...), each {"prompt",
    "sample", "text", "ids", "prompt_ids", "finish"}. Chat prompts stop at `stop_text`'s token too.
    Every rank of the model's layout calls it with the same prompts."""
    tok = policy.tokenizer
    template = ChatTemplate.for_tokenizer(chat_template, tok)
    encoded = [prompt_ids(policy, template, p, chat) for p in prompts]
    templated = [isinstance(p, list) or chat for p in prompts]
    engine = Engine(policy.chunks, eos_id=tok.eos, pad_id=tok.pad)
    turn_end = stop_ids(tok, stop_text)
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
    # one call per stop set (chat and plain prompts stop differently); one prompt at a time to stream
    groups = [[job] for job in jobs] if on_text else [
        [job for job in jobs if templated[job[0]] == t] for t in (True, False)
    ]  # fmt: skip
    results = {}
    for group in groups:
        if not group:
            continue
        p = params
        if templated[group[0][0]] and turn_end:
            p = SamplingParams(**{**params.__dict__, "stop_ids": tuple(params.stop_ids) + turn_end})
        stream = None
        if on_text is not None:
            shown = [""]

            def stream(_row, ids, job=group[0], shown=shown):
                text = tok.decode([t for t in ids if t != tok.eos and t not in turn_end])
                if text.startswith(shown[0]) and not text.endswith("\ufffd"):  # whole characters only
                    on_text(job, text[len(shown[0]) :])
                    shown[0] = text

        gens = engine.generate(
            [encoded[i] for i, _ in group], p, record_routing=False, keys=list(group), on_tokens=stream
        )
        for (i, j), g in zip(group, gens, strict=True):
            ids = list(g.response_ids)
            text = tok.decode([t for t in ids if t != tok.eos and t not in turn_end])
            results[(i, j)] = {"prompt": i, "sample": j, "text": text, "ids": ids, "finish": g.finish}
            results[(i, j)]["prompt_ids"] = encoded[i]
    return [results[job] for job in jobs]
