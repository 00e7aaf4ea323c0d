"""Megatron dist-checkpoint <-> Hugging Face directory for Step 3.5 Flash, streamed layer by layer.

    export: dist-checkpoint (any TP/EP/PP layout it was saved in) -> config.json (model_type step3p5),
            model-0000X-of-0000Y.safetensors + model.safetensors.index.json, tokenizer files
    import: HF directory (published hub dialect or the transformers-native dialect that
            Step3p7TextModel.save_pretrained writes) -> a TP=1 dist-checkpoint, which Megatron-Core
            loads into any target layout (dist-checkpointing reshards on load).

Streaming: export builds the model on the meta device and loads one group of tensors (embedding,
one decoder layer, one MTP module, ...) from the dist-checkpoint at a time, so peak memory is one
layer (for the 196B preset: ~4.6 GB fp32 for a MoE layer). Import reads one tensor at a time from
the safetensors files; the TP=1 checkpoint it writes is saved in one call (Megatron-Core's save
takes the whole state dict), so import needs the model's size in host memory.

Hub dialect (DESIGN.md section 4): model.layers.{i}.self_attn.{q,k,v,o,g}_proj.weight,
self_attn.{q,k}_norm.weight, moe.gate.weight, moe.router_bias, stacked experts
moe.{gate,up}_proj.weight [E, F, H] and moe.down_proj.weight [E, H, F], share_expert.*, dense layers
mlp.{gate,up,down}_proj.weight; MTP module k at model.layers.{n+k}: enorm, hnorm, eh_proj, its
sliding layer's keys, transformer.shared_head.norm.weight and transformer.shared_head.output.weight
(a copy of lm_head: Megatron-Core shares the head). HF's sliding_window counts the query itself, ours
does not: config.json carries W + 1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator

import torch

from megatron_step.convert.step_hf import _split_qkv

SHARD_BYTES = 2 * 1024**3


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def hub_config(cfg, dtype: str = "bfloat16", bos: int | None = None, eos: int | None = None) -> dict:
    """config.json in the published step3p5 format (all per-layer lists padded with the MTP layers)."""
    n, k = cfg.num_layers, cfg.mtp_num_layers
    full = [cfg.is_full_attention(i) for i in range(n)] + [False] * k
    routed = list(cfg.swiglu_limits) or [0.0] * n
    shared = list(cfg.swiglu_limits_shared) or [0.0] * n
    out = {
        "architectures": ["Step3p5ForCausalLM"],
        "model_type": "step3p5",
        "torch_dtype": dtype,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.dense_ffn_hidden_size,
        "num_hidden_layers": n,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "num_attention_heads": cfg.full_attention_heads,
        "num_attention_groups": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "use_qk_norm": cfg.qk_norm,
        "use_head_wise_attn_gate": cfg.head_gate,
        "attention_other_setting": {
            "attention_type": "sliding_attention",
            "num_attention_heads": cfg.sliding_attention_heads,
            "num_attention_groups": cfg.num_query_groups,
            "head_dim": cfg.head_dim,
            "true_head_dim": cfg.head_dim,
        },
        "layer_types": ["full_attention" if f else "sliding_attention" for f in full],
        "sliding_window": cfg.sliding_window + 1,
        "rope_theta": [cfg.rope_theta_full if f else cfg.rope_theta_sliding for f in full],
        "partial_rotary_factors": [
            cfg.rotary_fraction_full if f else cfg.rotary_fraction_sliding for f in full
        ],
        "use_moe": cfg.num_experts > 0,
        "moe_num_experts": cfg.num_experts,
        "moe_top_k": cfg.moe_topk,
        "moe_intermediate_size": cfg.moe_ffn_hidden_size,
        "share_expert_dim": cfg.shared_expert_ffn_hidden_size,
        "moe_layers_enum": ",".join(str(i) for i in range(n) if cfg.is_moe(i)),
        "moe_router_activation": "sigmoid",
        "use_moe_router_bias": True,
        "need_fp32_gate": True,
        "norm_expert_weight": True,
        "moe_router_scaling_factor": cfg.router_scaling_factor,
        "swiglu_limits": routed + [0.0] * k,
        "swiglu_limits_shared": shared + [0.0] * k,
        "rms_norm_eps": cfg.norm_eps,
        "zero_centered": cfg.zero_centered_gamma,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": k,
    }
    if cfg.rope_scaling_factor:
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "original_max_position_embeddings": cfg.rope_scaling_original_max_position,
            "low_freq_factor": cfg.rope_scaling_low_freq_factor,
            "high_freq_factor": cfg.rope_scaling_high_freq_factor,
        }
        out["yarn_only_types"] = ["full_attention"]
    if bos is not None:
        out["bos_token_id"] = bos
    if eos is not None:
        out["eos_token_id"] = eos
    return out


def config_from_hf_dir(path: str):
    """StepFlashConfig from an HF directory's config.json (either dialect), via transformers'
    own Step3p7TextConfig parsing of the legacy hub fields."""
    from transformers import Step3p7TextConfig

    from megatron_step.convert.step_hf import step_config_from_hf

    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    if raw.get("model_type") not in ("step3p5", None):
        raise ValueError(f"{path}/config.json: model_type={raw.get('model_type')!r}, expected 'step3p5'")
    keep = {k: v for k, v in raw.items() if k not in ("architectures", "auto_map", "model_type")}
    hf_cfg = Step3p7TextConfig(**keep)
    k = getattr(hf_cfg, "num_nextn_predict_layers", 0) or 0
    weights = [1.0 / k] * k if k else []
    return step_config_from_hf(hf_cfg, mtp_num_layers=k, mtp_loss_weights=weights)


# ---------------------------------------------------------------------------------------------
# per-layer tensor mapping (Megatron TP=1 names <-> hub names)
# ---------------------------------------------------------------------------------------------
def _layer_to_hub(t: dict, m: str, h: str, heads: int, moe: bool, cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """`t` holds Megatron tensors under prefix `m` (e.g. 'decoder.layers.3.'); yields hub keys under `h`."""
    q, k, v = _split_qkv(t[m + "self_attention.linear_qkv.weight"], heads, cfg.num_query_groups, cfg.head_dim)
    yield h + "self_attn.q_proj.weight", q
    yield h + "self_attn.k_proj.weight", k
    yield h + "self_attn.v_proj.weight", v
    yield h + "self_attn.o_proj.weight", t[m + "self_attention.linear_proj.weight"]
    yield h + "self_attn.g_proj.weight", t[m + "self_attention.head_gate.weight"]
    yield h + "self_attn.q_norm.weight", t[m + "self_attention.q_layernorm.weight"]
    yield h + "self_attn.k_norm.weight", t[m + "self_attention.k_layernorm.weight"]
    yield h + "input_layernorm.weight", t[m + "input_layernorm.weight"]
    yield h + "post_attention_layernorm.weight", t[m + "pre_mlp_layernorm.weight"]
    if moe:
        yield h + "moe.gate.weight", t[m + "mlp.router.weight"]
        yield h + "moe.router_bias", t[m + "mlp.router.expert_bias"]
        fc1 = [t[f"{m}mlp.experts.local_experts.{j}.linear_fc1.weight"] for j in range(cfg.num_experts)]
        yield h + "moe.gate_proj.weight", torch.stack([w.chunk(2, 0)[0] for w in fc1])
        yield h + "moe.up_proj.weight", torch.stack([w.chunk(2, 0)[1] for w in fc1])
        yield (
            h + "moe.down_proj.weight",
            torch.stack(
                [t[f"{m}mlp.experts.local_experts.{j}.linear_fc2.weight"] for j in range(cfg.num_experts)]
            ),
        )
        gate, up = t[m + "mlp.shared_experts.linear_fc1.weight"].chunk(2, 0)
        yield h + "share_expert.gate_proj.weight", gate
        yield h + "share_expert.up_proj.weight", up
        yield h + "share_expert.down_proj.weight", t[m + "mlp.shared_experts.linear_fc2.weight"]
    else:
        gate, up = t[m + "mlp.linear_fc1.weight"].chunk(2, 0)
        yield h + "mlp.gate_proj.weight", gate
        yield h + "mlp.up_proj.weight", up
        yield h + "mlp.down_proj.weight", t[m + "mlp.linear_fc2.weight"]


def _layer_from_hub(get, h: str, m: str, heads: int, moe: bool, cfg) -> Iterator[tuple[str, torch.Tensor]]:
    d, g = cfg.head_dim, cfg.num_query_groups
    r = heads // g
    q = get(h + "self_attn.q_proj.weight").view(g, r * d, -1)
    k = get(h + "self_attn.k_proj.weight").view(g, d, -1)
    v = get(h + "self_attn.v_proj.weight").view(g, d, -1)
    yield m + "self_attention.linear_qkv.weight", torch.cat([q, k, v], 1).reshape(g * (r + 2) * d, -1)
    yield m + "self_attention.linear_proj.weight", get(h + "self_attn.o_proj.weight")
    yield m + "self_attention.head_gate.weight", get(h + "self_attn.g_proj.weight")
    yield m + "self_attention.q_layernorm.weight", get(h + "self_attn.q_norm.weight")
    yield m + "self_attention.k_layernorm.weight", get(h + "self_attn.k_norm.weight")
    yield m + "input_layernorm.weight", get(h + "input_layernorm.weight")
    yield m + "pre_mlp_layernorm.weight", get(h + "post_attention_layernorm.weight")
    if moe:
        yield m + "mlp.router.weight", get(h + "moe.gate.weight")
        yield m + "mlp.router.expert_bias", get(h + "moe.router_bias").float()
        gate, up, down = (
            get(h + "moe.gate_proj.weight"),
            get(h + "moe.up_proj.weight"),
            get(h + "moe.down_proj.weight"),
        )
        for j in range(cfg.num_experts):
            yield f"{m}mlp.experts.local_experts.{j}.linear_fc1.weight", torch.cat([gate[j], up[j]], 0)
            yield f"{m}mlp.experts.local_experts.{j}.linear_fc2.weight", down[j]
        s = h + "share_expert."
        yield (
            m + "mlp.shared_experts.linear_fc1.weight",
            torch.cat([get(s + "gate_proj.weight"), get(s + "up_proj.weight")], 0),
        )
        yield m + "mlp.shared_experts.linear_fc2.weight", get(s + "down_proj.weight")
    else:
        yield (
            m + "mlp.linear_fc1.weight",
            torch.cat([get(h + "mlp.gate_proj.weight"), get(h + "mlp.up_proj.weight")], 0),
        )
        yield m + "mlp.linear_fc2.weight", get(h + "mlp.down_proj.weight")


def _groups(cfg) -> list[tuple[str, str]]:
    """(Megatron key prefix, label) of the units streamed one at a time."""
    out = [("embedding.", "embedding"), ("decoder.final_layernorm.", "final norm"), ("output_layer.", "head")]
    out += [(f"decoder.layers.{i}.", f"layer {i}") for i in range(cfg.num_layers)]
    out += [(f"mtp.layers.{k}.", f"MTP {k + 1}") for k in range(cfg.mtp_num_layers)]
    return out


def mcore_group_to_hub(
    prefix: str, t: dict, cfg, head: torch.Tensor | None
) -> Iterator[tuple[str, torch.Tensor]]:
    n = cfg.num_layers
    if prefix == "embedding.":
        yield "model.embed_tokens.weight", t["embedding.word_embeddings.weight"]
    elif prefix == "decoder.final_layernorm.":
        yield "model.norm.weight", t["decoder.final_layernorm.weight"]
    elif prefix == "output_layer.":
        yield "lm_head.weight", t["output_layer.weight"]
    elif m := re.match(r"decoder\.layers\.(\d+)\.$", prefix):
        i = int(m.group(1))
        heads = cfg.full_attention_heads if cfg.is_full_attention(i) else cfg.sliding_attention_heads
        yield from _layer_to_hub(t, prefix, f"model.layers.{i}.", heads, cfg.is_moe(i), cfg)
    elif m := re.match(r"mtp\.layers\.(\d+)\.$", prefix):
        h = f"model.layers.{n + int(m.group(1))}."
        yield h + "enorm.weight", t[prefix + "enorm.weight"]
        yield h + "hnorm.weight", t[prefix + "hnorm.weight"]
        yield h + "eh_proj.weight", t[prefix + "eh_proj.weight"]
        yield from _layer_to_hub(t, prefix + "mtp_model_layer.", h, cfg.sliding_attention_heads, False, cfg)
        yield h + "transformer.shared_head.norm.weight", t[prefix + "final_layernorm.weight"]
        yield h + "transformer.shared_head.output.weight", head


def hub_to_mcore(get, cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """`get(hub_key)` -> tensor; yields the TP=1 Megatron state dict, tensor by tensor."""
    n = cfg.num_layers
    yield "embedding.word_embeddings.weight", get("model.embed_tokens.weight")
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    yield "output_layer.weight", get("lm_head.weight")
    for i in range(n):
        heads = cfg.full_attention_heads if cfg.is_full_attention(i) else cfg.sliding_attention_heads
        yield from _layer_from_hub(
            get, f"model.layers.{i}.", f"decoder.layers.{i}.", heads, cfg.is_moe(i), cfg
        )
    for k in range(cfg.mtp_num_layers):
        h, m = f"model.layers.{n + k}.", f"mtp.layers.{k}."
        yield m + "enorm.weight", get(h + "enorm.weight")
        yield m + "hnorm.weight", get(h + "hnorm.weight")
        yield m + "eh_proj.weight", get(h + "eh_proj.weight")
        yield from _layer_from_hub(get, h, m + "mtp_model_layer.", cfg.sliding_attention_heads, False, cfg)
        yield (
            m + "final_layernorm.weight",
            get(h + "transformer.shared_head.norm.weight", h + "shared_head.norm.weight"),
        )


# transformers-native dialect (Step3p7TextModel.save_pretrained) -> hub names, for import
_NATIVE_TO_HUB = [
    (re.compile(r"^layers\.(\d+)\.mlp\.gate\.e_score_correction_bias$"), r"model.layers.\1.moe.router_bias"),
    (re.compile(r"^layers\.(\d+)\.mlp\.gate\.weight$"), r"model.layers.\1.moe.gate.weight"),
    (re.compile(r"^layers\.(\d+)\.mlp\.experts\.down_proj$"), r"model.layers.\1.moe.down_proj.weight"),
    (re.compile(r"^layers\.(\d+)\.mlp\.shared_experts\."), r"model.layers.\1.share_expert."),
    (re.compile(r"^(layers|embed_tokens|norm)\."), r"model.\1."),
]


def hub_group_to_native(group: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Hub names -> the transformers-native names `Step3p7TextModel.from_pretrained` loads as is
    (stacked gate_up_proj, mlp.gate.*, mlp.shared_experts.*, no `model.` prefix; no MTP)."""
    out = {}
    for key, t in group.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)$", key)
        if m and int(m.group(1)) >= num_layers:
            continue  # MTP modules: not part of Step3p7TextModel
        if key.endswith("moe.up_proj.weight") or key.endswith("moe.gate_proj.weight"):
            if key.endswith("moe.gate_proj.weight"):
                base = key[: -len("moe.gate_proj.weight")]
                out[base.removeprefix("model.") + "mlp.experts.gate_up_proj"] = torch.cat(
                    [t, group[base + "moe.up_proj.weight"]], dim=1
                )
            continue
        native = key.removeprefix("model.")
        native = (
            native.replace("moe.gate.weight", "mlp.gate.weight")
            .replace("moe.router_bias", "mlp.gate.e_score_correction_bias")
            .replace("moe.down_proj.weight", "mlp.experts.down_proj")
            .replace("share_expert.", "mlp.shared_experts.")
        )
        out[native] = t
    return out


def hub_names(stored_keys) -> dict[str, tuple[str, str | None]]:
    """hub name -> (stored key, part) for the keys of either dialect; part "gate"/"up" selects a half
    of a native stacked `gate_up_proj` [E, 2F, H]."""
    out = {}
    for key in stored_keys:
        if key.endswith("mlp.experts.gate_up_proj"):
            base = "model." + key[: -len("mlp.experts.gate_up_proj")] + "moe."
            out[base + "gate_proj.weight"] = (key, "gate")
            out[base + "up_proj.weight"] = (key, "up")
            continue
        hub = key
        for pat, rep in _NATIVE_TO_HUB:
            if pat.search(hub):
                hub = pat.sub(rep, hub)
                break
        out[hub] = (key, None)
    return out


# ---------------------------------------------------------------------------------------------
# HF directory reading
# ---------------------------------------------------------------------------------------------
class HFReader:
    """Tensor-by-tensor access to every *.safetensors file of a directory, in hub names."""

    def __init__(self, path: str):
        from safetensors import safe_open

        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors files")
        self._handles = [safe_open(os.path.join(path, f), "pt") for f in files]
        self._where: dict[str, tuple[int, str, str | None]] = {}  # hub key -> (file, stored key, part)
        for idx, h in enumerate(self._handles):
            for hub, (key, part) in hub_names(h.keys()).items():
                self._where[hub] = (idx, key, part)
        self.dialect = "native" if "embed_tokens.weight" in {k for _, k, _ in self._where.values()} else "hub"

    def keys(self):
        return self._where.keys()

    def get(self, *names: str) -> torch.Tensor:
        for name in names:
            if name in self._where:
                idx, key, part = self._where[name]
                t = self._handles[idx].get_tensor(key)
                if part is not None:
                    t = t.chunk(2, dim=1)[0 if part == "gate" else 1].contiguous()
                return t
        raise KeyError(f"tensor {names[0]!r} not found in the HF checkpoint ({self.dialect} dialect)")


# ---------------------------------------------------------------------------------------------
# export / import
# ---------------------------------------------------------------------------------------------
class _ShardWriter:
    def __init__(self, out_dir: str, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []

    def add(self, key: str, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if self.buf and self.size + nbytes > self.max_bytes:
            self.flush()
        self.buf[key] = t.detach().clone()  # own storage: safetensors refuses shared (view) tensors
        self.size += nbytes

    def flush(self):
        from safetensors.torch import save_file

        if not self.buf:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.buf, os.path.join(self.out_dir, name), metadata={"format": "pt"})
        self.files.append((name, list(self.buf)))
        self.buf, self.size = {}, 0

    def finish(self) -> dict:
        self.flush()
        n = len(self.files)
        weight_map, total = {}, 0
        for i, (tmp, keys) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, final))
            weight_map.update({k: final for k in keys})
        for final in set(weight_map.values()):
            total += os.path.getsize(os.path.join(self.out_dir, final))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
        return index


def export_to_hf(
    ckpt_dir: str,
    out_dir: str,
    cfg,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_model: str | None = None,
    shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
    dialect: str = "hub",
) -> dict:
    """Stream a Megatron dist-checkpoint (any layout) into an HF directory, in the published hub
    dialect (with MTP) or the transformers-native one (`Step3p7TextModel.from_pretrained` loads it;
    no MTP). Needs a 1-rank torch.distributed group (megatron_step.platform.setup(ParallelConfig()))."""
    if dialect not in ("hub", "native"):
        raise ValueError(f"dialect={dialect!r}: one of hub, native")
    from megatron.core import dist_checkpointing
    from tqdm import tqdm

    from megatron_step.models.step_flash import build_step_flash
    from megatron_step.platform import ParallelConfig

    with torch.device("meta"):
        model = build_step_flash(cfg, ParallelConfig(), use_te=False, initialize=False)
    sharded = model.sharded_state_dict()
    os.makedirs(out_dir, exist_ok=True)
    writer = _ShardWriter(out_dir, shard_bytes)
    head = None
    groups = _groups(cfg)
    # the LM head first: MTP modules need a copy of it
    groups.sort(key=lambda g: g[0] != "output_layer.")
    for prefix, label in tqdm(groups, desc="export", disable=not progress):
        sub = {}
        for key, obj in sharded.items():
            if key.startswith(prefix) and "_extra_state" not in key:
                obj.data = torch.empty(obj.data.shape, dtype=torch.float32)
                sub[key] = obj
        if not sub:
            raise KeyError(f"{label}: no tensors under {prefix!r} in the model; wrong config?")
        loaded = dist_checkpointing.load({"model": sub}, ckpt_dir)["model"]
        group = dict(mcore_group_to_hub(prefix, loaded, cfg, head))
        head = group.get("lm_head.weight", head)
        if dialect == "native":
            group = hub_group_to_native(group, cfg.num_layers)
        for key, t in group.items():
            writer.add(key, t.to(dtype))
        del loaded, sub
    index = writer.finish()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hub_config(cfg, dtype=str(dtype).removeprefix("torch.")), f, indent=2)
    if tokenizer_model:
        shutil.copy(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
    return index


def import_from_hf(
    hf_dir: str, ckpt_dir: str, cfg=None, dtype: torch.dtype = torch.float32, progress: bool = True
) -> dict:
    """HF directory (hub or native dialect) -> a TP=1 Megatron dist-checkpoint under ckpt_dir.
    `cfg` (optional) must agree with the directory's config.json; the first differing field is named."""
    from megatron.core import dist_checkpointing
    from tqdm import tqdm

    from megatron_step.models.step_flash import build_step_flash
    from megatron_step.platform import ParallelConfig

    found = config_from_hf_dir(hf_dir)
    if cfg is not None:
        for field in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "head_dim",
            "num_query_groups",
            "full_attention_heads",
            "sliding_attention_heads",
            "full_attention_period",
            "sliding_window",
            "first_k_dense",
            "dense_ffn_hidden_size",
            "num_experts",
            "moe_topk",
            "moe_ffn_hidden_size",
            "shared_expert_ffn_hidden_size",
            "mtp_num_layers",
        ):
            if getattr(cfg, field) != getattr(found, field):
                raise ValueError(
                    f"model.{field}={getattr(cfg, field)!r} but {hf_dir}/config.json has "
                    f"{getattr(found, field)!r}; use a matching preset or override"
                )
    cfg = cfg or found
    reader = HFReader(hf_dir)
    if reader.dialect == "native" and cfg.mtp_num_layers:
        cfg = cfg.replace(mtp_num_layers=0, mtp_loss_weights=[])  # transformers-native files have no MTP
    with torch.device("meta"):
        model = build_step_flash(cfg, ParallelConfig(), use_te=False, initialize=False)
    sharded = {k: v for k, v in model.sharded_state_dict().items() if "_extra_state" not in k}
    seen = set()
    for key, t in tqdm(hub_to_mcore(reader.get, cfg), desc="import", disable=not progress):
        if key not in sharded:
            raise KeyError(f"{key}: produced by the mapping but not in the Megatron model")
        sharded[key].data = t.to(dtype if not key.endswith("expert_bias") else torch.float32)
        seen.add(key)
    missing = set(sharded) - seen
    if missing:
        raise KeyError(f"Megatron tensors with no source in {hf_dir}: {sorted(missing)[:5]}")
    os.makedirs(ckpt_dir, exist_ok=True)
    dist_checkpointing.save({"model": sharded}, ckpt_dir)
    return {"tensors": len(seen), "dialect": reader.dialect, "config": cfg}
