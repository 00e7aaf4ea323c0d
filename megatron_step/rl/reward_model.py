"""Preference reward: a Bradley-Terry reward model on the policy's own backbone, turned into a
win-rate reward against a reference answer with a length penalty.

    rm = RewardModel.from_backbone(policy_gpt_model)        # same architecture, fresh scalar head
    train_bradley_terry(rm, tokenizer, pairs, steps=200)     # pairs: [{"prompt", "chosen", "rejected"}]
    rm.save("runs/rm/rm");  rm = RewardModel.load("runs/rm/rm", parallel)   # any TP / EP layout
    pref = PreferenceReward(rm, tokenizer, length_penalty=0.1)
    pref.score_batch([(prompt, response, reference_response), ...])   # -> list[float]

Model: the Step 3.5 Flash GPTModel (Megatron-Core) run without labels; a forward hook keeps the
final norm's output, and a linear head maps the hidden state at the last token to a scalar r(x, y).
Bradley-Terry: P(chosen > rejected) = sigmoid(r_c - r_r), loss -log sigmoid(r_c - r_r).

Win-rate reward (our rule; the report gives no formula): against a reference response y_ref,
    reward = sigmoid(r(x, y) - r(x, y_ref)) - length_penalty * max(0, |y| - |y_ref|) / |y_ref|
i.e. the probability that the RM prefers y to the reference, minus a penalty on each token beyond the
reference's length (relative), so padding an answer cannot buy preference.

Training is single-process: at this size the RM trains in minutes on one CPU core. Scoring runs
inside the RL trainer (batched), not in the isolated reward workers, because it is a model on the
trainer's devices, in the run's layout: a saved RM is a directory -- the backbone as a Megatron-Core
distributed checkpoint (`backbone/`, resharded on load to the run's TP / EP) and `head.pt` (the
scalar head and the model config). Under TP / EP its forward is collective: every rank of the run
scores its own batch together (rl.rollouts). Sequence parallelism is off for it (every position's
hidden state is read). PP is not supported (the stage refuses it). A file written by an earlier
version (one torch blob, `.pt`) still loads, in a one-rank layout only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from megatron_step.models.step_flash import StepFlashConfig, build_step_flash
from megatron_step.platform import ParallelConfig
from megatron_step.rl.engine import sequence_parallel_off
from megatron_step.rl.tasks import Problem, prompt_text, solution_text


class RewardModel(torch.nn.Module):
    def __init__(self, backbone, hidden_size: int, model_config: dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1, device=next(backbone.parameters()).device)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.model_config = model_config or {}
        self._hidden = None
        backbone.decoder.final_layernorm.register_forward_hook(self._keep)

    def _keep(self, module, args, out):
        self._hidden = out  # (S, B, H)

    @classmethod
    def from_backbone(cls, gpt_model, model_config=None) -> RewardModel:
        return cls(gpt_model, gpt_model.config.hidden_size, model_config)

    def forward(self, tokens_BS: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """(B,) scores of right-padded sequences with the given lengths."""
        dev = self.head.weight.device
        tokens_BS, lengths_B = tokens_BS.to(dev), lengths_B.to(dev)
        b, s = tokens_BS.shape
        pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
        with sequence_parallel_off(self.backbone):
            self.backbone(tokens_BS, pos, None)
        h_BH = self._hidden[lengths_B - 1, torch.arange(b, device=dev)]
        self._hidden = None
        return self.head(h_BH.float()).squeeze(-1)

    def save(self, path: str) -> None:
        """Write the directory `path` (module docstring). Every rank of the model's layout calls it."""
        os.makedirs(os.path.join(path, "backbone"), exist_ok=True)
        dist_checkpointing.save(self.backbone.sharded_state_dict(), os.path.join(path, "backbone"))
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            head = {k: v.detach().cpu() for k, v in self.head.state_dict().items()}
            torch.save({"head": head, "model_config": self.model_config}, os.path.join(path, "head.pt"))

    @classmethod
    def load(cls, path: str, parallel=None) -> RewardModel:
        """Rebuild the backbone from the saved StepFlashConfig in `parallel`'s layout (default: one
        rank) and load the weights; every rank of the layout calls it."""
        parallel = parallel or ParallelConfig()
        if os.path.isfile(path):  # an earlier version's single torch blob: a one-rank model only
            if ps.model_parallel_is_initialized() and ps.get_model_parallel_group().size() > 1:
                raise ValueError(
                    f"rl.reward_model={path!r} is a single-file reward model (one rank); re-save it as a "
                    "directory (tools/train_reward_model.py --out DIR) to load it under TP / EP"
                )
            blob = torch.load(path, map_location="cpu", weights_only=True)
            cfg = StepFlashConfig(**blob["model_config"])
            rm = cls.from_backbone(build_step_flash(cfg, parallel), blob["model_config"])
            rm.load_state_dict(blob["state"])
            return rm.eval()
        meta = os.path.join(path, "head.pt")
        if not os.path.isfile(meta):
            raise FileNotFoundError(
                f"rl.reward_model={path!r}: no reward model there (expected {meta} and backbone/, as "
                "tools/train_reward_model.py writes them)"
            )
        # our own dict of tensors and plain values, loaded on the CPU first
        blob = torch.load(meta, map_location="cpu", weights_only=True)
        backbone = build_step_flash(StepFlashConfig(**blob["model_config"]), parallel)
        sharded = backbone.sharded_state_dict()
        backbone.load_state_dict(dist_checkpointing.load(sharded, os.path.join(path, "backbone")))
        rm = cls.from_backbone(backbone, blob["model_config"])
        rm.head.load_state_dict(blob["head"])
        return rm.eval()


def _batch(tokenizer, texts: list[tuple[str, str]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [
        tokenizer.with_bos(tokenizer.encode(p) + tokenizer.encode(" " + r) + [tokenizer.eos])[:max_len]
        for p, r in texts
    ]
    n = max(len(x) for x in seqs)
    tokens = torch.full((len(seqs), n), tokenizer.pad, dtype=torch.long)
    for i, x in enumerate(seqs):
        tokens[i, : len(x)] = torch.tensor(x)
    return tokens, torch.tensor([len(x) for x in seqs])


# ---------------------------------------------------------------------------------------------
# pairwise data for the embedded task
# ---------------------------------------------------------------------------------------------
def arithmetic_pairs(problems: list[Problem], seed: int) -> list[dict]:
    """Preference pairs from worked solutions: chosen = the correct solution; rejected = the same
    solution with one corruption -- a wrong final answer, a wrong intermediate result carried on,
    a missing answer tag, or padding chatter -- so the RM learns correctness and format, and the
    chatter pairs teach it that length is not quality."""
    rng = random.Random(seed)
    pairs = []
    for p in problems:
        good = solution_text(p)
        kind = rng.choice(("answer", "step", "format", "chatter"))
        if kind == "answer":
            wrong = str(int(p.answer) + rng.choice([-3, -2, -1, 1, 2, 3, 10]))
            bad = good.rsplit("<answer>", 1)[0] + f"<answer>{wrong}</answer>"
        elif kind == "step":
            first = good.split(". ")[0]
            lhs, val = first.rsplit(" = ", 1)
            bad = good.replace(first, f"{lhs} = {int(val) + rng.choice([-2, -1, 1, 2])}", 1)
            if bad == good:
                bad = good.rsplit("<answer>", 1)[0] + f"<answer>{int(p.answer) + 1}</answer>"
        elif kind == "format":
            bad = good.replace("<answer>", "").replace("</answer>", "")
        else:
            bad = (
                "Let me think. "
                + good.rsplit("<answer>", 1)[0]
                + "Let me check again. "
                + good.split(". ")[-1]
            )
            bad = bad.rsplit("<answer>", 1)[0] + f"<answer>{int(p.answer) + 1}</answer>"
        pairs.append({"prompt": prompt_text(p), "chosen": good, "rejected": bad, "kind": kind})
    return pairs


def write_pairs(pairs: list[dict], path: str) -> None:
    with open(path, "w") as f:
        for x in pairs:
            f.write(json.dumps(x) + "\n")


def read_pairs(path: str) -> list[dict]:
    pairs = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            x = json.loads(line)
            missing = {"prompt", "chosen", "rejected"} - set(x)
            if missing:
                raise ValueError(f"{path}:{i}: pair lacks {sorted(missing)}")
            pairs.append(x)
    return pairs


# ---------------------------------------------------------------------------------------------
# training and evaluation
# ---------------------------------------------------------------------------------------------
def pair_accuracy(rm: RewardModel, tokenizer, pairs: list[dict], max_len: int = 96, batch: int = 32) -> float:
    rm.eval()
    hits = 0.0  # a tie counts half (a zero-initialised head ties everything: 0.5, not 0)
    with torch.no_grad():
        for i in range(0, len(pairs), batch):
            chunk = pairs[i : i + batch]
            c = rm(*_batch(tokenizer, [(x["prompt"], x["chosen"]) for x in chunk], max_len))
            r = rm(*_batch(tokenizer, [(x["prompt"], x["rejected"]) for x in chunk], max_len))
            hits += float((c > r).sum()) + 0.5 * float((c == r).sum())
    return hits / len(pairs)


def train_bradley_terry(
    rm: RewardModel, tokenizer, pairs: list[dict], steps: int, batch: int = 16, lr: float = 1e-3,
    max_len: int = 96, seed: int = 0, progress=None,
) -> list[float]:  # fmt: skip
    """AdamW on -log sigmoid(r_chosen - r_rejected); returns the loss per step."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=0.0)
    rm.train()
    losses = []
    for step in range(steps):
        chunk = rng.sample(pairs, min(batch, len(pairs)))
        c = rm(*_batch(tokenizer, [(x["prompt"], x["chosen"]) for x in chunk], max_len))
        r = rm(*_batch(tokenizer, [(x["prompt"], x["rejected"]) for x in chunk], max_len))
        loss = -torch.nn.functional.logsigmoid(c - r).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, loss.item())
    rm.eval()
    return losses


@dataclasses.dataclass
class PreferenceReward:
    """Win-rate reward against a reference response (module docstring). In-process and batched."""

    rm: RewardModel
    tokenizer: object
    length_penalty: float = 0.1
    max_len: int = 96

    @torch.no_grad()
    def score_batch(self, items: list[tuple[str, str, str]]) -> list[float]:
        """items: (prompt, response, reference_response)."""
        if not items:
            return []
        ours = self.rm(*_batch(self.tokenizer, [(p, r) for p, r, _ in items], self.max_len))
        refs = self.rm(*_batch(self.tokenizer, [(p, ref) for p, _, ref in items], self.max_len))
        out = []
        for (_, r, ref), a, b in zip(items, ours, refs):
            n, n_ref = len(self.tokenizer.encode(r)), max(1, len(self.tokenizer.encode(ref)))
            out.append(float(torch.sigmoid(a - b)) - self.length_penalty * max(0, n - n_ref) / n_ref)
        return out


__all__ = [
    "PreferenceReward",
    "RewardModel",
    "arithmetic_pairs",
    "pair_accuracy",
    "read_pairs",
    "train_bradley_terry",
    "write_pairs",
]
