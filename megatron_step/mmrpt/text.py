"""Caption text for MMRPT: sentences with their token spans, the fill-in (masked reconstruction) format,
attribute parsing of generated-scene sentences, and the semantic-visual reward.

Token layout of one sample (<s>, P image placeholders, then the caption, sentence by sentence):
    plain:    <s> <image>*P  s_0 ␣s_1 ␣s_2 ...  </s>
    fill-in:  <s> <image>*P  s_0 ␣<mask> ␣s_2 ...  ␣<answer>  |  s_1 </answer> </s>      (prompt | response)
    think:    ... ␣<think>  |  ... </think><answer> s_1 </answer> </s>
The leading <s> is where attention "sinks" (the first position of a causal model collects the mass
of queries that attend nowhere in particular); without it the first image patch would, and D(s)
would count that mass as visual.
Each sentence is tokenised on its own (with its leading space) so a sentence's tokens are the same in
every format and D(s) can be read per sentence from the plain layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_step.data.scenes import NUMBER_WORDS, PALETTE, POSITION_PHRASES, SHAPES, SIZES

IMAGE, MASK, ANSWER, ANSWER_END, THINK, THINK_END = (
    "<image>",
    "<mask>",
    "<answer>",
    "</answer>",
    "<think>",
    "</think>",
)


@dataclass
class Sentence:
    text: str
    visual: bool | None  # ground truth (generated scenes); None when unknown
    attributes: dict  # what the sentence states (generated scenes), {} otherwise


def sentences_of(caption: str, meta: dict) -> list[Sentence]:
    """The caption's sentences in order: from the generator's ground truth when `meta` has it, else
    split after '.', '!' or '?' followed by a space."""
    if meta.get("sentences"):
        ordered = sorted(meta["sentences"], key=lambda s: s["start"])
        return [Sentence(s["text"], bool(s["visual"]), dict(s.get("attributes") or {})) for s in ordered]
    parts = [p for p in re.split(r"(?<=[.!?])\s+", caption.strip()) if p]
    return [Sentence(p, None, {}) for p in parts]


class CaptionCodec:
    """Encodes samples in the layouts above with one tokenizer (StepTokenizer)."""

    def __init__(self, tok, num_image_tokens: int, response_format: str = "answer"):
        self.tok = tok
        self.p = num_image_tokens
        self.format = response_format
        self.image_id = tok.token_id(IMAGE)
        self.mask_id = tok.token_id(MASK)
        self.answer_id = tok.token_id(ANSWER)
        self.answer_end_id = tok.token_id(ANSWER_END)
        self.think_id = tok.token_id(THINK)
        self.think_end_id = tok.token_id(THINK_END)
        self.eos = tok.eos
        self.prefix = [tok.bos] + [self.image_id] * num_image_tokens
        self.visual = (1, 1 + num_image_tokens)  # [start, end) of the image slots

    def sentence_ids(self, sentences: list[Sentence]) -> list[list[int]]:
        return [self.tok.encode(s.text if i == 0 else " " + s.text) for i, s in enumerate(sentences)]

    def plain(self, sentences: list[Sentence]) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, spans): spans[k] = [start, end) positions of sentence k's tokens in ids."""
        ids, spans = list(self.prefix), []
        for piece in self.sentence_ids(sentences):
            spans.append((len(ids), len(ids) + len(piece)))
            ids += piece
        return ids + [self.eos], spans

    def fill_in(self, sentences: list[Sentence], masked: int) -> tuple[list[int], list[int]]:
        """(prompt, target response) with sentence `masked` replaced by <mask>."""
        pieces = self.sentence_ids(sentences)
        prompt = list(self.prefix)
        for k, piece in enumerate(pieces):
            if k == masked:
                prompt += ([] if k == 0 else self.tok.encode(" ")) + [self.mask_id]
            else:
                prompt += piece
        prompt += self.tok.encode(" ")
        target = self.tok.encode(sentences[masked].text) + [self.answer_end_id, self.eos]
        if self.format == "think":
            return prompt + [self.think_id], [self.think_end_id, self.answer_id] + target
        return prompt + [self.answer_id], target

    def answer_of(self, response_ids: list[int]) -> tuple[str | None, bool]:
        """(the answer text, well formed) of a response in this codec's format. Well formed: closed by
        </answer> (think: `...</think><answer>...</answer>`). An unclosed answer is still read up to
        the end of the response (for the match terms), but is not well formed."""
        ids = list(response_ids)
        if ids and ids[-1] == self.eos:
            ids = ids[:-1]
        if self.format == "think":
            if self.think_end_id not in ids:
                return None, False
            ids = ids[ids.index(self.think_end_id) + 1 :]
            if not ids or ids[0] != self.answer_id:
                return None, False
            ids = ids[1:]
        closed = self.answer_end_id in ids
        if closed:
            ids = ids[: ids.index(self.answer_end_id)]
        return self.tok.decode(ids).strip(), closed


# --- attributes of generated-scene sentences ---------------------------------------------------------
_WORD_NUMBER = {v: k for k, v in NUMBER_WORDS.items()}
_POSITION_OF_PHRASE = {v: k for k, v in POSITION_PHRASES.items()}


def parse_attributes(text: str) -> dict:
    """The attributes a scene sentence states (the generator's vocabulary): shape, colour, size,
    position, count. Unknown words are ignored; the first mention of each attribute wins."""
    low = text.lower()
    words = re.findall(r"[a-z]+", low)
    out: dict = {}
    for w in words:
        if "colour" not in out and w in PALETTE:
            out["colour"] = w
        elif "size" not in out and w in SIZES:
            out["size"] = w
        elif "shape" not in out and (w in SHAPES or (w.endswith("s") and w[:-1] in SHAPES)):
            out["shape"] = w if w in SHAPES else w[:-1]
    for phrase, pos in _POSITION_OF_PHRASE.items():
        if phrase in low:
            out["position"] = pos
            break
    m = re.search(r"\bthere (?:is|are) (one|two|three|four)\b", low)
    if m:
        out["count"] = _WORD_NUMBER[m.group(1)]
    return out


def attribute_score(answer: str | None, target: dict) -> float | None:
    """Share of the target sentence's stated attributes the answer states identically; a wrong extra
    attribute (one the target does not state) costs as much as a missing one. None: nothing to score."""
    if not target:
        return None
    got = parse_attributes(answer or "")
    right = sum(1 for k, v in target.items() if got.get(k) == v)
    extra = sum(1 for k in got if k not in target)
    return right / (len(target) + extra)


def _norm_words(s: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", s.lower())


def semantic_visual_reward(answer: str | None, well_formed: bool, target: Sentence, cfg) -> dict:
    """Reward terms for one reconstruction (cfg: MMRPTConfig weights). exact: normalised words equal;
    prefix: the length of the common word prefix / the target's words; attribute: `attribute_score`
    (generated scenes); format: well formed. `total` is the weighted sum."""
    want, got = _norm_words(target.text), _norm_words(answer or "")
    exact = float(bool(want) and want == got)
    n = 0
    while n < min(len(want), len(got)) and want[n] == got[n]:
        n += 1
    prefix = n / len(want) if want else 0.0
    attr = attribute_score(answer, target.attributes)
    out = {"exact": exact, "prefix": prefix, "format": float(well_formed)}
    total = cfg.reward_exact * exact + cfg.reward_prefix * prefix + cfg.reward_format * out["format"]
    if attr is not None:
        out["attribute"] = attr
        total += cfg.reward_attribute * attr
    out["total"] = total
    return out


__all__ = [
    "CaptionCodec",
    "Sentence",
    "attribute_score",
    "parse_attributes",
    "semantic_visual_reward",
    "sentences_of",
]
