"""MMRPT text: sentence spans, the fill-in format, answer parsing, attribute parsing, the reward,
ROC-AUC and the adaptive masking threshold."""

from __future__ import annotations

import random

import pytest

from megatron_step.config.fields import build
from megatron_step.data.scenes import generate_scene, scene_rng
from megatron_step.data.tokenizer import StepTokenizer, train_tokenizer
from megatron_step.mmrpt.config import MMRPTConfig
from megatron_step.mmrpt.dependency import roc_auc, select_masked
from megatron_step.mmrpt.text import (
    CaptionCodec,
    Sentence,
    attribute_score,
    parse_attributes,
    semantic_visual_reward,
    sentences_of,
)


@pytest.fixture(scope="module")
def codec(tmp_path_factory):

    d = tmp_path_factory.mktemp("tok")
    captions = [generate_scene(scene_rng(0, i))[1] for i in range(300)]
    (d / "c.txt").write_text("\n".join(captions))
    return CaptionCodec(StepTokenizer(train_tokenizer([str(d / "c.txt")], str(d / "t"), 320)), 16)


def _sample(i: int):
    _, caption, truth = generate_scene(scene_rng(7, i))
    return caption, sentences_of(caption, truth)


def test_sentences_come_in_caption_order_with_the_generator_truth():
    caption, sents = _sample(3)
    assert " ".join(s.text for s in sents) == caption
    assert all(s.visual in (True, False) for s in sents)
    assert sentences_of("One. Two!  Three?", {}) == [
        Sentence(t, None, {}) for t in ("One.", "Two!", "Three?")
    ]


def test_plain_spans_decode_to_the_sentences(codec):
    _, sents = _sample(5)
    ids, spans = codec.plain(sents)
    assert ids[0] == codec.tok.bos and ids[1:17] == [codec.image_id] * 16 and ids[-1] == codec.eos
    assert codec.visual == (1, 17)
    for s, (a, b) in zip(sents, spans):
        assert codec.tok.decode(ids[a:b]).strip() == s.text


@pytest.mark.parametrize("fmt", ["answer", "think"])
def test_fill_in_masks_one_sentence_and_the_target_parses_back(codec, fmt):
    c = CaptionCodec(codec.tok, 16, fmt)
    _, sents = _sample(11)
    k = len(sents) - 1
    prompt, target = c.fill_in(sents, k)
    assert prompt.count(c.mask_id) == 1
    text = c.tok.decode(prompt[17:])
    assert sents[k].text not in text and all(s.text in text for j, s in enumerate(sents) if j != k)
    answer, ok = c.answer_of(target)
    assert ok and answer == sents[k].text
    # unclosed: read to the end, not well formed; think without </think>: nothing
    answer, ok = c.answer_of(target[:-2] if fmt == "answer" else target[2:])
    assert not ok
    assert (answer is None) == (fmt == "think")


def test_attributes_parse_as_the_generator_states_them():
    for i in range(200):
        _, sents = _sample(i)
        for s in sents:
            if s.visual:
                assert parse_attributes(s.text) == s.attributes, s.text
    assert parse_attributes("This is a simple drawing.") == {}


def test_attribute_score_counts_wrong_and_extra_attributes():
    target = {"colour": "red", "shape": "circle", "position": "left"}
    assert attribute_score("The red circle is on the left.", target) == 1.0
    assert attribute_score("The blue circle is on the left.", target) == pytest.approx(2 / 3)
    assert attribute_score("A small red circle is on the left.", target) == pytest.approx(3 / 4)
    assert attribute_score(None, target) == 0.0
    assert attribute_score("anything", {}) is None


def test_reward_terms_and_weights():
    cfg = MMRPTConfig()
    t = Sentence(
        "The red circle is on the left.", True, {"colour": "red", "shape": "circle", "position": "left"}
    )
    full = semantic_visual_reward("the red circle is on the left", True, t, cfg)
    assert full["exact"] == 1.0 and full["prefix"] == 1.0 and full["attribute"] == 1.0
    assert full["total"] == pytest.approx(
        cfg.reward_exact + cfg.reward_prefix + cfg.reward_attribute + cfg.reward_format
    )
    half = semantic_visual_reward("The red square is on the left.", False, t, cfg)
    assert half["exact"] == 0.0 and half["prefix"] == pytest.approx(2 / 7) and half["format"] == 0.0
    assert half["attribute"] == pytest.approx(2 / 3)
    generic = semantic_visual_reward(
        "Every shape has a name.", True, Sentence("Every shape has a name.", False, {}), cfg
    )
    assert "attribute" not in generic and generic["total"] == pytest.approx(
        cfg.reward_exact + cfg.reward_prefix + cfg.reward_format
    )


def test_roc_auc_matches_pair_counting():
    rng = random.Random(0)
    scores = [round(rng.random(), 1) for _ in range(60)]  # ties on purpose
    labels = [rng.random() < 0.4 for _ in range(60)]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert roc_auc(scores, labels) == pytest.approx(pairs)
    assert roc_auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1.0], [True])


def test_masking_takes_each_captions_top_sentence_at_the_batch_quantile():
    dep = [[0.1, 0.5, 0.2], [0.05, 0.04], [0.3, 0.9]]
    choice, tau = select_masked(dep, 0.5)
    assert tau == pytest.approx(0.2)
    assert choice == [1, None, 1]
    assert select_masked(dep, 0.0)[0] == [1, 0, 1]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="mmrpt.group_size=1"):
        MMRPTConfig(group_size=1)
    with pytest.raises(ValueError, match="mmrpt.objective='sft'"):
        MMRPTConfig(objective="sft")
    with pytest.raises(ValueError, match="vision.image_size=30"):
        build(MMRPTConfig, {"vision": {"image_size": 30}}, "mmrpt")
    assert build(MMRPTConfig, {"loss": "mispo"}, "mmrpt").loss.kind == "mispo"
