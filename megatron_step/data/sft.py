"""Supervised fine-tuning data: chat conversations from JSONL or Parquet files (megatron_step.data.records),
rendered with the chat template, loss on the assistant turns only.

    cfg = SFTConfig(train_files=["chats.jsonl"], valid_files=["chats_valid.jsonl"])
    train = ChatDataset.from_files(cfg.train_files, cfg, tokenizer, template, seq_length=512, seed=1234)

A record (one JSON object per line, or one row of a .parquet file) is either
  - a conversation: `{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."},
    ...]}` (the OpenAI chat format; multi-turn; the key is `sft.messages_key`), or
  - a prompt/response pair: `{"prompt": "...", "response": "..."}` (keys `sft.prompt_key`,
    `sft.response_key`; an optional system prompt under `sft.system_key`), taken as one user and one
    assistant turn.
A line that cannot be read (not JSON, no such key, a wrong role, no assistant turn, an assistant turn
the template drops) fails with `file:line: what` -- or, with `sft.skip_bad_lines=true`, is skipped and
counted (the run banner and `data.skipped` say how many, and the first few reasons).

One conversation is `seq_length + 1` tokens at most (tokens and labels shifted by one); a longer one
is cut at the end (`sft.overlong=truncate`, counted) or dropped (`sft.overlong=drop`). By default every
row holds one conversation and padding (which has no loss). With `sft.pack=true` conversations are
packed into rows first-fit (one goes into the first of the last 64 rows with room), each row carrying
`segment_ids`; the forward step (megatron_step.training.step.lm_forward_step) turns them into a
block-diagonal causal attention mask, so a conversation attends only to itself -- on the sliding-window
layers too (megatron_step.models.step_flash.layers.StepCoreAttention) -- and the MTP losses skip the
positions whose targets lie in the next conversation. `position_ids` restart at 0 per conversation;
RoPE (the layers' own tables, indexed by the row position) enters attention only through the distance
of query and key, so a conversation at row offset o scores as at 0 (tests/data/test_packing.py: the
per-conversation loss equals the conversation run alone within 1e-5). The labels are each
conversation's own, so no token predicts the next conversation's first token. Packing needs the local
layer spec; Transformer Engine's fused attention takes packed sequences through THD `packed_seq_params`,
which this path does not build (refused at start).

Order: the samples of the training files are shuffled once with the run seed (`sft.shuffle`); the
trainer reads global batch s from sample s x global_batch_size on (megatron_step.training.lm), so the
step fixes the data position and a resumed run reads what the uninterrupted one would.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import torch

from megatron_step.data.chat import ChatError, ChatTemplate, encode_chat
from megatron_step.data.records import iter_records

__all__ = ["ChatDataset", "SFTConfig", "SFTDataError", "read_conversations"]

OVERLONG = ("truncate", "drop")
PACK_WINDOW = 64  # packing looks for room in the last 64 rows (bounded cost on millions of samples)


@dataclass
class SFTConfig:
    """The `sft:` section of an SFT run (posttrain/train_sft.py)."""

    # JSONL / Parquet files of conversations (module docstring); empty: the embedded chat data, worked
    # arithmetic written as conversations (megatron_step.stages.sft.embedded_chats)
    train_files: list[str] = field(default_factory=list)
    # held-out conversations for the validation loss; empty with train_files set: the last
    # `valid_fraction` of the training records
    valid_files: list[str] = field(default_factory=list)
    valid_fraction: float = 0.05
    messages_key: str = "messages"
    prompt_key: str = "prompt"
    response_key: str = "response"
    system_key: str = "system"
    chat_template: str | None = None  # a Jinja file; None: the embedded tokenizer's ChatML template
    skip_bad_lines: bool = False  # skip and count unreadable lines instead of stopping at the first
    overlong: str = "truncate"  # a conversation longer than data.seq_length + 1 tokens: cut or drop it
    # several conversations per row, each attending only to itself (module docstring); local layer spec
    pack: bool = False
    shuffle: bool = True  # shuffle the training samples once, with train.seed
    # weight of each MTP depth's loss (the Step 3.5 Flash report uses 0.1 in SFT); None: the model's
    mtp_loss_weight: float | None = 0.1
    # the embedded data only: how many conversations it writes for training and for validation
    embedded_train: int = 512
    embedded_valid: int = 64

    def __post_init__(self):
        if self.overlong not in OVERLONG:
            raise ValueError(f"sft.overlong={self.overlong!r}: expected one of {', '.join(OVERLONG)}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"sft.valid_fraction={self.valid_fraction}: must be in [0, 1)")
        if self.mtp_loss_weight is not None and self.mtp_loss_weight < 0:
            raise ValueError(f"sft.mtp_loss_weight={self.mtp_loss_weight}: must be >= 0 (or null)")
        for name in ("train_files", "valid_files"):
            for p in getattr(self, name):
                if not os.path.isfile(p):
                    raise ValueError(
                        f"sft.{name}: {p!r} is not a file (JSONL or .parquet, one conversation per record)"
                    )
        if self.valid_files and not self.train_files:
            raise ValueError("sft.valid_files without sft.train_files: give the training files too")


class SFTDataError(ValueError):
    """A file that cannot be trained on (the message names the file, the line and the field)."""


def _messages(record, cfg: SFTConfig) -> list[dict]:
    if not isinstance(record, dict):
        raise ChatError(f"expected a JSON object, got {type(record).__name__}")
    if cfg.messages_key in record:
        return record[cfg.messages_key]
    if cfg.prompt_key in record or cfg.response_key in record:
        for key in (cfg.prompt_key, cfg.response_key):
            if not isinstance(record.get(key), str):
                raise ChatError(f"field {key!r}: expected text, got {record.get(key)!r:.60}")
        system = record.get(cfg.system_key)
        head = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
        return [
            *head,
            {"role": "user", "content": record[cfg.prompt_key]},
            {"role": "assistant", "content": record[cfg.response_key]},
        ]
    raise ChatError(
        f"no field {cfg.messages_key!r} (a conversation) nor {cfg.prompt_key!r} / {cfg.response_key!r} "
        f"(a pair); its fields: {sorted(record)[:8]} (sft.messages_key / sft.prompt_key set the names)"
    )


def read_conversations(paths: list[str], cfg: SFTConfig, tokenizer, template: ChatTemplate) -> dict:
    """Every readable conversation of `paths` encoded: {"samples": [(ids, learn)], "skipped": n,
    "reasons": [first few "file:line: why"], "lines": n}. Raises SFTDataError on the first bad line
    unless `cfg.skip_bad_lines`, and when the files hold no conversation at all."""
    samples, reasons, skipped, lines = [], [], 0, 0
    for path in paths:
        records = iter_records(path)
        while True:
            try:
                at, record = next(records)
            except StopIteration:
                break
            except ChatError as e:  # the file itself (not Parquet, no pyarrow)
                raise SFTDataError(str(e)) from None
            lines += 1
            try:
                if isinstance(record, ChatError):
                    raise record
                ids, learn = encode_chat(tokenizer, template, _messages(record, cfg))
                if not any(learn):
                    raise ChatError("the template rendered no assistant token")
            except ChatError as e:
                where = f"{at}: {e}"
                if not cfg.skip_bad_lines:
                    hint = "sft.skip_bad_lines=true skips and counts such lines"
                    raise SFTDataError(f"{where} ({hint})") from None
                skipped += 1
                if len(reasons) < 5:
                    reasons.append(where)
                continue
            samples.append((ids, learn))
    if not samples:
        raise SFTDataError(
            f"{', '.join(paths)}: no conversation to train on ({lines} lines, {skipped} skipped)"
        )
    return {"samples": samples, "skipped": skipped, "reasons": reasons, "lines": lines}


class ChatDataset(torch.utils.data.Dataset):
    """Encoded conversations as fixed-length rows {"tokens", "labels", "loss_mask"}: one conversation
    per row, or with `pack` several (see the module docstring), then also "position_ids" (0 at each
    conversation's start) and "segment_ids" (which conversation of the row a position belongs to: 0,
    1, ...; the padding after the last one gets its own id). `info`: counts for the run banner."""

    def __init__(self, samples, tokenizer, seq_length: int, overlong: str = "truncate", pack: bool = False):
        self.seq, self.pad, self.packed = seq_length, tokenizer.pad, pack
        self.samples, cut, dropped = [], 0, 0  # (tokens, labels, loss mask) lists per conversation
        for ids, learn in samples:
            if len(ids) > seq_length + 1:
                if overlong == "drop":
                    dropped += 1
                    continue
                ids, learn, cut = ids[: seq_length + 1], learn[: seq_length + 1], cut + 1
            if any(learn[1:]):  # the loss of predicting token i + 1
                self.samples.append((ids[:-1], ids[1:], [float(x) for x in learn[1:]]))
            else:  # cut before its first assistant token
                dropped += 1
        if not self.samples:
            raise SFTDataError(
                f"no conversation left after cutting to data.seq_length={seq_length} ({dropped} had no "
                "assistant token within it): raise data.seq_length"
            )
        self.info = {"samples": len(self.samples), "truncated": cut, "dropped_overlong": dropped}
        self._rows()

    def _rows(self) -> None:
        """Rows from the samples in their order: one each, or packed first-fit (a conversation goes into
        the first of the last `PACK_WINDOW` rows it fits in, else it starts a new row; rows keep the
        order they were started in)."""
        groups = [[s] for s in self.samples]
        if self.packed:
            groups, free = [], []  # free[i]: tokens left in row i
            for s in self.samples:
                n = len(s[0])
                lo = max(0, len(groups) - PACK_WINDOW)
                i = next((i for i in range(lo, len(groups)) if free[i] >= n), None)
                if i is None:
                    groups.append([])
                    free.append(self.seq)
                    i = len(groups) - 1
                groups[i].append(s)
                free[i] -= n
        self.items = [self._row(g) for g in groups]
        if self.packed:
            tokens = sum(len(s[0]) for s in self.samples)
            self.info.update(rows=len(self.items), fill=round(tokens / (len(self.items) * self.seq), 4))

    def _row(self, group) -> dict:
        seq = self.seq
        tokens = torch.full((seq,), self.pad, dtype=torch.long)
        labels = torch.full((seq,), self.pad, dtype=torch.long)
        mask = torch.zeros(seq)
        pos, segs, at = (
            torch.zeros(seq, dtype=torch.long),
            torch.full((seq,), len(group), dtype=torch.long),
            0,
        )
        for k, (t, lab, m) in enumerate(group):
            n = len(t)
            tokens[at : at + n], labels[at : at + n] = torch.tensor(t), torch.tensor(lab)
            mask[at : at + n] = torch.tensor(m)
            pos[at : at + n], segs[at : at + n] = torch.arange(n), k
            at += n
        item = {"tokens": tokens, "labels": labels, "loss_mask": mask}
        if self.packed:
            pos[at:] = torch.arange(seq - at)
            item.update(position_ids=pos, segment_ids=segs)
        return item

    def shuffle(self, seed: int) -> ChatDataset:
        """Shuffle the conversations once with `seed` (then pack them, with packing)."""
        random.Random(seed).shuffle(self.samples if self.packed else self.items)
        if self.packed:
            self._rows()
        return self

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]
