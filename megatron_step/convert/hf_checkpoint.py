"""Megatron dist-checkpoint <-> Hugging Face directory for Step 3.5 Flash, streamed layer by layer.

    from megatron_step.convert.hf_checkpoint import export_to_hf, import_from_hf
    export_to_hf("runs/tiny/checkpoints/iter_0000300", "runs/tiny/hf", tiny())        # hub dialect
    export_to_hf(ckpt, "runs/tiny/hf_native", tiny(), dialect="native")              # from_pretrained
    import_from_hf("runs/tiny/hf", "runs/from_hf")                                    # -> TP=1 ckpt

    export: dist-checkpoint (any TP/EP/PP layout it was saved in) -> config.json (model_type step3p5),
            model-0000X-of-0000Y.safetensors + model.safetensors.index.json, tokenizer files
    import: HF directory (published hub dialect or the transformers-native dialect that
            Step3p7TextModel.save_pretrained writes) -> a TP=1 dist-checkpoint, which Megatron-Core
            loads into any target layout (dist-checkpointing reshards on load).

This module is file I/O only; the key names, the tensor transforms and the config translations are
the model record's HF adapter, megatron_step/models/step_flash/hf.py (the dialects are described
there).

Streaming: export builds the model on the meta device and loads one group of tensors (embedding,
one decoder layer, one MTP module, ...; `hf.groups`) from the dist-checkpoint at a time, so peak
memory is one layer (for the 196B preset: ~4.6 GB fp32 for a MoE layer). Import reads one tensor at
a time from the safetensors files; the TP=1 checkpoint it writes is saved in one call (Megatron-Core's
save takes the whole state dict), so import needs the model's size in host memory.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import torch
from megatron.core import dist_checkpointing
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from megatron_step.data.chat import ChatTemplate
from megatron_step.data.tokenizer import load_tokenizer, save_hf_tokenizer
from megatron_step.models.step_flash import build_step_flash, hf, hf_config
from megatron_step.models.step_flash.config import SHAPE_FIELDS
from megatron_step.platform import ParallelConfig

SHARD_BYTES = 2 * 1024**3


class HFReader:
    """Tensor-by-tensor access to every *.safetensors file of an HF directory, under the names they
    are stored with; the dialect is told by the key names, and `megatron_tensors` reads the directory
    through the adapter's key table in that dialect."""

    def __init__(self, path: str):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors files")
        self._handles = [safe_open(os.path.join(path, f), "pt") for f in files]
        self._where: dict[str, int] = {}  # stored key -> index of its file
        for idx, handle in enumerate(self._handles):
            self._where.update(dict.fromkeys(handle.keys(), idx))
        self.dialect = hf.dialect_of(self._where)

    def keys(self):
        return self._where.keys()

    def get(self, *names: str) -> torch.Tensor:
        """The tensor stored under the first of `names` present (later names: aliases)."""
        for name in names:
            if name in self._where:
                return self._handles[self._where[name]].get_tensor(name)
        raise KeyError(f"tensor {names[0]!r} not found in the HF checkpoint ({self.dialect} dialect)")

    def megatron_tensors(self, cfg) -> Iterator[tuple[str, torch.Tensor]]:
        """The TP=1 Megatron state dict of `cfg`'s model, tensor by tensor."""
        return hf.hf_to_mcore(self.get, cfg, self.dialect)


class _ShardWriter:
    """Buffers tensors into safetensors files of at most `max_bytes` (one tensor may exceed it), then
    names them model-0000X-of-0000Y and writes the index."""

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
    chat_template: str | None = None,
) -> dict:
    """Stream a Megatron dist-checkpoint (any layout) into an HF directory, in the published hub
    dialect (with MTP) or the transformers-native one (`Step3p7TextModel.from_pretrained` loads it;
    no MTP). Needs a 1-rank torch.distributed group (megatron_step.platform.setup(ParallelConfig())).
    `tokenizer_model` (a sentencepiece .model or an HF tokenizer directory) is written beside the
    weights as tokenizer.json + tokenizer_config.json with the chat template the run used
    (`chat_template`, a Jinja file; else the tokenizer's own; else the embedded default), and
    generation_config.json stops at eos and at the template's end of turn (<|im_end|>) when the
    tokenizer has it."""
    if dialect not in hf.DIALECTS:
        raise ValueError(f"dialect={dialect!r}: one of hub, native")
    with torch.device("meta"):
        model = build_step_flash(cfg, ParallelConfig(), use_te=False, initialize=False)
    sharded = model.sharded_state_dict()
    os.makedirs(out_dir, exist_ok=True)
    writer = _ShardWriter(out_dir, shard_bytes)
    head = None
    groups = [g for g in hf.groups(cfg) if g.prefix(dialect) is not None]
    groups.sort(key=lambda g: g.label != "head")  # the LM head first: MTP modules carry a copy of it
    for group in tqdm(groups, desc="export", disable=not progress):
        names = group.all_mcore_names()
        missing = [name for name in names if name not in sharded]
        if missing:
            raise KeyError(f"{group.label}: {missing[:3]} not in the model; wrong config?")
        sub = {}
        for name in names:
            sub[name] = sharded[name]
            sub[name].data = torch.empty(sub[name].data.shape, dtype=torch.float32)
        loaded = dist_checkpointing.load({"model": sub}, ckpt_dir)["model"]
        head = loaded.get("output_layer.weight", head)
        for key, t in hf.mcore_to_hf(group, loaded, dialect, head):
            writer.add(key, t.to(dtype))
        del loaded, sub
    index = writer.finish()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config.hub_config(cfg, dtype=str(dtype).removeprefix("torch.")), f, indent=2)
    if tokenizer_model:
        _write_tokenizer(tokenizer_model, out_dir, chat_template)
    return index


def _write_tokenizer(path: str, out_dir: str, chat_template: str | None) -> None:
    tok = load_tokenizer(path)
    template = ChatTemplate.for_tokenizer(chat_template, tok)
    save_hf_tokenizer(tok, out_dir, template.text)
    stops = [tok.eos]
    with contextlib.suppress(KeyError):  # a tokenizer without ChatML's end of turn stops at eos only
        stops.append(tok.token_id("<|im_end|>"))
    gen = {"eos_token_id": stops if len(stops) > 1 else stops[0], "pad_token_id": tok.pad}
    if tok.bos is not None:
        gen["bos_token_id"] = tok.bos
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)


def import_from_hf(
    hf_dir: str, ckpt_dir: str, cfg=None, dtype: torch.dtype = torch.float32, progress: bool = True
) -> dict:
    """HF directory (hub or native dialect) -> a TP=1 Megatron dist-checkpoint under ckpt_dir.
    `cfg` (optional) must agree with the directory's config.json; the first differing field is named."""
    found = hf_config.config_from_hf_dir(hf_dir)
    if cfg is not None:
        for field in SHAPE_FIELDS:
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
    for key, t in tqdm(reader.megatron_tensors(cfg), desc="import", disable=not progress):
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
