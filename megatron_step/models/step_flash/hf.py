"""Step 3.5 Flash <-> Hugging Face weights: the model record's key table, used in both directions and
for both dialects (the config translations are megatron_step.models.step_flash.hf_config).

    from megatron_step.models.step_flash import hf, tiny
    native = hf.mcore_to_hf_native(model_state, tiny())            # for transformers' Step3p7TextModel
    state = hf.hf_native_to_mcore(native, tiny())                  # and back

Two HF dialects, both read and written:
- "hub": the published Step-3.5-Flash format (docs/design.md §4.3; config.json model_type step3p5):
  `model.`-prefixed keys, moe.gate / moe.router_bias, routed experts as stacked moe.{gate,up}_proj
  [E, F, H] and moe.down_proj [E, H, F], share_expert.*, and MTP module k as layer num_layers + k
  with enorm, hnorm, eh_proj, a sliding layer's keys, transformer.shared_head.norm (also read when
  named shared_head.norm) and transformer.shared_head.output, a copy of lm_head (Megatron-Core
  shares one head; the copy is written, never read).
- "native": what transformers' `Step3p7TextModel.save_pretrained` writes and `from_pretrained` loads
  as is: no `model.` prefix, mlp.gate.weight / mlp.gate.e_score_correction_bias, one stacked
  mlp.experts.gate_up_proj [E, 2F, H], mlp.shared_experts.*, no MTP (the text model has none), and
  `lm_head.weight` alongside.

One table, `TABLE`, lists each tensor once: its Megatron-Core TP=1 name, its hub name, its native name
and the named `Transform` between them. Both directions (`mcore_to_hf`, `hf_to_mcore`) and both
dialects are read off it, so a fix to a mapping is made once. `groups(cfg)` lays the table out in the
units the streaming exporter loads one at a time (embedding, final norm, head, each decoder layer,
each MTP module). File I/O (safetensors, dist-checkpoints) is in megatron_step.convert.

Layout facts (transformers 5.23 modeling_step3p7.py; Megatron-Core 0.19.2):
- Megatron `linear_qkv.weight` is grouped by KV head: for each of G groups, [q rows of its
  r = heads/G query heads (r*D), k (D), v (D)]; HF has separate q/k/v_proj with heads in order.
- Megatron gated `linear_fc1.weight` is [gate (F); up (F)]; HF dense/shared MLPs have gate_proj and
  up_proj, native routed experts one stacked gate_up_proj [E, 2F, H] with gate first -- the same order.
- Router: Megatron `router.weight` [E, H] / `router.expert_bias` [E] (fp32 in Megatron whatever the
  file's dtype). Head gate `head_gate.weight` [heads, H] is `g_proj.weight`.
- Norms are zero-centred on both sides (x_hat * (1 + w)), stored as w: copied as is.
- Window: ours W (query + W previous keys) is HF's `sliding_window = W + 1` (HF counts the query).
Shapes: E experts, F expert/FFN width, H hidden, D head dim, G KV groups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from megatron_step.models.step_flash.config import StepFlashConfig

DIALECTS = ("hub", "native")


# ---------------------------------------------------------------------------------------------
# transforms: Megatron tensors of one table entry <-> its HF tensors
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    """What a transform needs to know about the layer its tensors belong to."""

    heads: int  # query heads of this layer (full and sliding layers differ)
    groups: int  # KV heads
    head_dim: int
    experts: int


@dataclass(frozen=True)
class Transform:
    """Both directions of one named conversion. `to_hf(megatron_tensors, shape, n_hf)` returns the
    entry's `n_hf` HF tensors; `from_hf(hf_tensors, shape, n_mcore)` returns its `n_mcore` Megatron
    tensors. The counts come from the table row, so one transform serves dialects that store a
    tensor whole or in parts (routed experts' gate/up)."""

    name: str
    to_hf: Callable[[list[torch.Tensor], LayerShape | None, int], list[torch.Tensor]]
    from_hf: Callable[[list[torch.Tensor], LayerShape | None, int], list[torch.Tensor]]


def _same(ts, shape, n):
    return list(ts)


def _as_fp32(ts, shape, n):
    return [ts[0].float()]


def _qkv_split(ts, s, n):
    (w,) = ts  # (G * (r + 2) * D, H)
    r, d, hidden = s.heads // s.groups, s.head_dim, ts[0].shape[-1]
    per_group = w.view(s.groups, (r + 2) * d, hidden)
    return [part.reshape(-1, hidden) for part in per_group.split([r * d, d, d], dim=1)]  # q, k, v


def _qkv_merge(ts, s, n):
    hidden = ts[0].shape[-1]
    per_group = [t.reshape(s.groups, -1, hidden) for t in ts]  # q (G, r*D, H), k and v (G, D, H)
    return [torch.cat(per_group, dim=1).reshape(-1, hidden)]


def _gated_split(ts, shape, n):
    return list(ts[0].chunk(2, dim=0))  # (2F, H) -> gate (F, H), up (F, H)


def _gated_merge(ts, shape, n):
    return [torch.cat(ts, dim=0)]


def _stack(ts, shape, n):
    return [torch.stack(ts)]  # E x (A, B) -> (E, A, B)


def _unstack(ts, shape, n):
    return list(ts[0].unbind(0))


def _stack_gated(ts, shape, n):
    stacked = torch.stack(ts)  # E x (2F, H) -> (E, 2F, H), gate rows first: native gate_up_proj
    return [stacked] if n == 1 else [half.contiguous() for half in stacked.chunk(2, dim=1)]


def _unstack_gated(ts, shape, n):
    stacked = ts[0] if len(ts) == 1 else torch.cat(ts, dim=1)  # hub: gate (E, F, H), up (E, F, H)
    return list(stacked.unbind(0))


COPY = Transform("copy", _same, _same)
ROUTER_BIAS = Transform("router bias, fp32 in Megatron", _same, _as_fp32)
QKV = Transform("fused QKV grouped by KV head <-> q, k, v", _qkv_split, _qkv_merge)
GATED = Transform("gated fc1 [gate; up] <-> gate, up", _gated_split, _gated_merge)
EXPERTS = Transform("routed experts, one tensor each <-> stacked", _stack, _unstack)
EXPERTS_GATED = Transform(
    "routed experts' gated fc1 <-> stacked [gate; up] or gate, up", _stack_gated, _unstack_gated
)


# ---------------------------------------------------------------------------------------------
# the key table
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One row: names under the group's prefixes; a tuple of several names is one tensor in parts.
    "{j}" in a Megatron name runs over the routed experts. An empty tuple: not in that dialect."""

    mcore: tuple[str, ...]
    hub: tuple[str, ...]
    native: tuple[str, ...]
    transform: Transform
    hub_aliases: tuple[str, ...] = ()  # other published names of a one-tensor hub entry (read only)

    def hf(self, dialect: str) -> tuple[str, ...]:
        return self.hub if dialect == "hub" else self.native


def _row(mcore, hub, native, transform=COPY, hub_aliases=()) -> Entry:
    names = [(n,) if isinstance(n, str) else tuple(n) for n in (mcore, hub, native)]
    return Entry(*names, transform, tuple(hub_aliases))


_ATTENTION = (
    _row(
        "self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        QKV,
    ),
    _row("self_attention.linear_proj.weight", "self_attn.o_proj.weight", "self_attn.o_proj.weight"),
    _row("self_attention.head_gate.weight", "self_attn.g_proj.weight", "self_attn.g_proj.weight"),
    _row("self_attention.q_layernorm.weight", "self_attn.q_norm.weight", "self_attn.q_norm.weight"),
    _row("self_attention.k_layernorm.weight", "self_attn.k_norm.weight", "self_attn.k_norm.weight"),
    _row("input_layernorm.weight", "input_layernorm.weight", "input_layernorm.weight"),
    _row("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", "post_attention_layernorm.weight"),
)
_DENSE_MLP = (
    _row(
        "mlp.linear_fc1.weight",
        ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        GATED,
    ),
    _row("mlp.linear_fc2.weight", "mlp.down_proj.weight", "mlp.down_proj.weight"),
)

# Every tensor once. Decoder-layer rows are under decoder.layers.{i}. / model.layers.{i}. / layers.{i}.,
# MTP rows under mtp.layers.{k}. / model.layers.{num_layers + k}. (no native name: no MTP there).
TABLE: dict[str, tuple[Entry, ...]] = {
    "embedding": (
        _row("embedding.word_embeddings.weight", "model.embed_tokens.weight", "embed_tokens.weight"),
    ),
    "final norm": (_row("decoder.final_layernorm.weight", "model.norm.weight", "norm.weight"),),
    "head": (_row("output_layer.weight", "lm_head.weight", "lm_head.weight"),),
    "attention": _ATTENTION,
    "dense mlp": _DENSE_MLP,
    "moe": (
        _row("mlp.router.weight", "moe.gate.weight", "mlp.gate.weight"),
        _row("mlp.router.expert_bias", "moe.router_bias", "mlp.gate.e_score_correction_bias", ROUTER_BIAS),
        _row(
            "mlp.experts.local_experts.{j}.linear_fc1.weight",
            ("moe.gate_proj.weight", "moe.up_proj.weight"),
            "mlp.experts.gate_up_proj",
            EXPERTS_GATED,
        ),
        _row(
            "mlp.experts.local_experts.{j}.linear_fc2.weight",
            "moe.down_proj.weight",
            "mlp.experts.down_proj",
            EXPERTS,
        ),
        _row(
            "mlp.shared_experts.linear_fc1.weight",
            ("share_expert.gate_proj.weight", "share_expert.up_proj.weight"),
            ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
            GATED,
        ),
        _row(
            "mlp.shared_experts.linear_fc2.weight",
            "share_expert.down_proj.weight",
            "mlp.shared_experts.down_proj.weight",
        ),
    ),
    # an MTP module: its input norms and projection, one sliding dense layer, its own final norm
    "mtp": (
        _row("enorm.weight", "enorm.weight", ()),
        _row("hnorm.weight", "hnorm.weight", ()),
        _row("eh_proj.weight", "eh_proj.weight", ()),
        *(
            dataclasses.replace(e, mcore=tuple("mtp_model_layer." + n for n in e.mcore), native=())
            for e in _ATTENTION + _DENSE_MLP
        ),
        _row(
            "final_layernorm.weight",
            "transformer.shared_head.norm.weight",
            (),
            hub_aliases=["shared_head.norm.weight"],
        ),
    ),
}
# the hub name of the LM head copy each MTP module carries (Megatron-Core has one shared head)
MTP_HEAD_COPY = "transformer.shared_head.output.weight"


@dataclass(frozen=True)
class Group:
    """The unit the streaming exporter loads at once, and the prefixes its table rows go under."""

    label: str
    mcore: str
    hub: str
    native: str | None  # None: the group is not stored in the native dialect (MTP modules)
    entries: tuple[Entry, ...]
    shape: LayerShape | None = None
    head_copy: str | None = None  # hub name of a copy of lm_head stored with the group

    def prefix(self, dialect: str) -> str | None:
        return self.hub if dialect == "hub" else self.native

    def mcore_names(self, entry: Entry) -> list[str]:
        experts = range(self.shape.experts) if self.shape else ()
        out = []
        for name in entry.mcore:
            out += [self.mcore + name.format(j=j) for j in experts] if "{j}" in name else [self.mcore + name]
        return out

    def all_mcore_names(self) -> list[str]:
        return [name for e in self.entries for name in self.mcore_names(e)]


def groups(cfg: StepFlashConfig) -> list[Group]:
    """The table laid out for a model: embedding, final norm, head, each decoder layer, each MTP module."""
    n = cfg.num_layers
    out = [Group(label, "", "", "", TABLE[label]) for label in ("embedding", "final norm", "head")]
    for i in range(n):
        heads = cfg.full_attention_heads if cfg.is_full_attention(i) else cfg.sliding_attention_heads
        shape = LayerShape(heads, cfg.num_query_groups, cfg.head_dim, cfg.num_experts)
        mlp = TABLE["moe"] if cfg.is_moe(i) else TABLE["dense mlp"]
        out.append(
            Group(
                f"layer {i}",
                f"decoder.layers.{i}.",
                f"model.layers.{i}.",
                f"layers.{i}.",
                TABLE["attention"] + mlp,
                shape,
            )
        )
    mtp_shape = LayerShape(cfg.sliding_attention_heads, cfg.num_query_groups, cfg.head_dim, cfg.num_experts)
    for k in range(cfg.mtp_num_layers):
        out.append(
            Group(
                f"MTP {k + 1}",
                f"mtp.layers.{k}.",
                f"model.layers.{n + k}.",
                None,
                TABLE["mtp"],
                mtp_shape,
                MTP_HEAD_COPY,
            )
        )
    return out


def _check_dialect(dialect: str):
    if dialect not in DIALECTS:
        raise ValueError(f"dialect={dialect!r}: one of {', '.join(DIALECTS)}")


def mcore_to_hf(
    group: Group, tensors: Mapping[str, torch.Tensor], dialect: str, head: torch.Tensor | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The group's Megatron tensors (full TP=1 names) -> (HF name, tensor) in `dialect`, in table
    order. `head` is the LM head, for the copy an MTP module carries in the hub dialect."""
    _check_dialect(dialect)
    prefix = group.prefix(dialect)
    if prefix is None:
        return
    for entry in group.entries:
        names = entry.hf(dialect)
        if not names:
            continue
        ts = [tensors[name] for name in group.mcore_names(entry)]
        yield from zip(
            [prefix + n for n in names], entry.transform.to_hf(ts, group.shape, len(names)), strict=True
        )
    if group.head_copy and dialect == "hub":
        if head is None:
            raise ValueError(f"{group.label}: needs the LM head for its copy {group.head_copy}")
        yield prefix + group.head_copy, head


def hf_to_mcore(
    get: Callable[..., torch.Tensor], cfg: StepFlashConfig, dialect: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """`get(name, *aliases)` -> the stored HF tensor of the first name present (KeyError if none);
    yields the TP=1 Megatron state dict of `cfg`'s model, tensor by tensor (no MTP from native)."""
    _check_dialect(dialect)
    for group in groups(cfg):
        prefix = group.prefix(dialect)
        if prefix is None:
            continue
        for entry in group.entries:
            names = entry.hf(dialect)
            if not names:
                continue
            aliases = entry.hub_aliases if dialect == "hub" else ()
            ts = (
                [get(prefix + names[0], *(prefix + a for a in aliases))]
                if len(names) == 1
                else [get(prefix + n) for n in names]
            )
            mcore = group.mcore_names(entry)
            yield from zip(mcore, entry.transform.from_hf(ts, group.shape, len(mcore)), strict=True)


def dialect_of(keys) -> str:
    """The dialect of a set of stored HF keys: native when its embedding name is there, else hub."""
    native_embedding = TABLE["embedding"][0].native[0]
    return "native" if native_embedding in set(keys) else "hub"


def _getter(tensors: Mapping[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    def get(*names):
        for name in names:
            if name in tensors:
                return tensors[name]
        raise KeyError(names[0])

    return get


def mcore_to_hf_native(state: Mapping[str, torch.Tensor], cfg: StepFlashConfig) -> dict[str, torch.Tensor]:
    """Full (TP=1) Megatron state dict -> transformers-native keys of `Step3p7TextModel` plus
    `lm_head.weight`, in memory (to run the same weights in transformers). MTP modules are not
    part of that model and are dropped."""
    out: dict[str, torch.Tensor] = {}
    for group in groups(cfg):
        out.update(mcore_to_hf(group, state, "native"))
    return out


def hf_native_to_mcore(hf: Mapping[str, torch.Tensor], cfg: StepFlashConfig) -> dict[str, torch.Tensor]:
    """Inverse of `mcore_to_hf_native`: transformers-native keys (+ `lm_head.weight`) -> the full
    (TP=1) Megatron state dict of the backbone (no MTP), in memory."""
    return dict(hf_to_mcore(_getter(hf), cfg, "native"))
