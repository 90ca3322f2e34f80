"""Caption metrics: hand-checked pycocoevalcap values, CiderD equal to pycocoevalcap's Cider, offline behaviour.

Each METEOR run starts a JVM that loads a paraphrase table (~8 s), so the Java-backed scores are computed once per
module (`corpus_result`) and every other test either reuses them or makes the Java part skip before it starts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as meteor_module

from modeling_fsgr_pma.evaluation import metrics
from modeling_fsgr_pma.evaluation.metrics import CiderD, compute_caption_metrics, load_caption_metric, simple_tokenize

# Raw captions (capitals, full stops) so that the PTB tokenizer has work to do.
PREDICTIONS = {"exact": "A dog runs on the grass.", "hand": "A man on a horse.", "disjoint": "Green tree"}
REFERENCES = {
    "exact": ["a dog runs on the grass", "a brown dog running across a lawn"],
    "hand": ["a man is riding a brown horse", "a person sits on a horse at the beach"],
    "disjoint": ["a cat sleeping", "the cat is asleep on a sofa"],
}

# BLEU-1 over the corpus = clipped unigram matches / predicted words x brevity penalty (pycocoevalcap's "closest"):
#   exact:    6 words, 6 matches, closest reference length 6 (of 6, 7)
#   hand:     5 words, 5 matches (a x2 in ref 1, man, on in ref 2, horse), closest reference length 7 (of 7, 9)
#   disjoint: 2 words, 0 matches, closest reference length 3 (of 3, 7)
#   -> 11 / 13 matches; 13 predicted words vs 16 reference words: BP = exp(1 - 16 / 13)
BLEU_1 = 11 / 13 * math.exp(1 - 16 / 13)

# ROUGE-L, pycocoevalcap's beta 1.2 with the best precision and the best recall over references, mean over images:
#   exact:    the prediction is reference 1, so P = R = 1 and F = 1
#   hand:     "a man on a horse" vs ref 1: LCS "a man a horse" = 4; vs ref 2: LCS "a on a horse" = 4
#             P = max(4/5, 4/5) = 0.8, R = max(4/7, 4/9) = 4/7
#   disjoint: no common word, F = 0
P_HAND, R_HAND = 0.8, 4 / 7
ROUGE_HAND = (1 + 1.2**2) * P_HAND * R_HAND / (R_HAND + 1.2**2 * P_HAND)
ROUGE_L = (1.0 + ROUGE_HAND + 0.0) / 3


@pytest.fixture(scope="module")
def corpus_result() -> dict:
    return compute_caption_metrics(PREDICTIONS, REFERENCES)


def test_keys_are_pycocoevalcap_names(corpus_result):
    assert set(metrics.METRIC_NAMES) | {"skipped", "tokenizer"} == set(corpus_result)
    assert corpus_result["tokenizer"] == "PTBTokenizer"


def test_a_subset_of_metrics_gives_the_same_values(corpus_result, monkeypatch):
    def no_java_metric(*args, **kwargs):
        raise AssertionError("METEOR was computed although not asked for")

    monkeypatch.setattr(metrics, "_meteor_score", no_java_metric)
    subset = compute_caption_metrics(PREDICTIONS, REFERENCES, names=("CIDEr", "Bleu_2"))
    assert set(subset) == {"CIDEr", "Bleu_2", "skipped", "tokenizer"}
    assert subset["CIDEr"] == corpus_result["CIDEr"] and subset["Bleu_2"] == corpus_result["Bleu_2"]
    with pytest.raises(ValueError, match="Unknown metrics"):
        compute_caption_metrics(PREDICTIONS, REFERENCES, names=("CIDEr-D",))


def test_bleu_1_matches_hand_computation(corpus_result):
    assert corpus_result["Bleu_1"] == pytest.approx(BLEU_1, rel=1e-6)
    assert 0 < corpus_result["Bleu_4"] <= corpus_result["Bleu_1"]


def test_rouge_l_matches_hand_computation(corpus_result):
    assert corpus_result["ROUGE_L"] == pytest.approx(ROUGE_L, rel=1e-9)


def test_cider_and_meteor_are_scores(corpus_result):
    assert corpus_result["CIDEr"] > 0
    assert isinstance(corpus_result["METEOR"], float) and 0 < corpus_result["METEOR"] <= 1


def test_spice_is_skipped_with_a_reason(corpus_result):
    assert corpus_result["SPICE"] is None
    assert "stanford-corenlp-3.6.0" in corpus_result["skipped"]["SPICE"]
    assert set(corpus_result["skipped"]) == {"SPICE"}


def test_evaluate_module_loads_offline_and_agrees(monkeypatch, tmp_path):
    import evaluate.config  # a submodule: not an attribute of `evaluate` until imported
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    # METEOR skipped on both sides: the module passes its result through, and a second METEOR JVM costs ~10 s.
    monkeypatch.setattr(metrics, "_METEOR_JARS", (tmp_path / "meteor-1.5.jar",))
    expected = compute_caption_metrics(PREDICTIONS, REFERENCES)
    metric = load_caption_metric()
    ids = list(REFERENCES)
    result = metric.compute(predictions=[PREDICTIONS[i] for i in ids], references=[REFERENCES[i] for i in ids])
    scores = {name: result.pop(name) for name in metrics.METRIC_NAMES if result[name] is not None}
    assert scores == pytest.approx({name: expected[name] for name in scores}, rel=1e-12)
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert result == {key: value for key, value in expected.items() if key not in scores}


def test_without_java_falls_back_and_skips(corpus_result, monkeypatch):
    monkeypatch.setenv("PATH", "")
    result = compute_caption_metrics(PREDICTIONS, REFERENCES)
    assert result["METEOR"] is None and result["SPICE"] is None
    assert {"PTBTokenizer", "METEOR", "SPICE"} == set(result["skipped"])
    assert all("java is not on PATH" in reason for reason in result["skipped"].values())
    # simple_tokenize gives PTBTokenizer's tokens on these captions, so the Python metrics do not move.
    assert result["tokenizer"] == "simple_tokenize"
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert result[name] == pytest.approx(corpus_result[name], rel=1e-12)


def test_missing_meteor_jar_is_skipped(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "_METEOR_JARS", (tmp_path / "meteor" / "meteor-1.5.jar",))
    result = compute_caption_metrics(PREDICTIONS, REFERENCES)
    assert result["METEOR"] is None
    assert "meteor-1.5.jar" in result["skipped"]["METEOR"]


def test_failing_meteor_process_is_skipped(monkeypatch):
    # The jar check passes but java cannot open the jar it is given: the process dies before answering.
    monkeypatch.setattr(meteor_module, "METEOR_JAR", "no-such-meteor.jar")
    result = compute_caption_metrics(PREDICTIONS, REFERENCES, tokenize=False)
    assert result["METEOR"] is None
    assert result["skipped"]["METEOR"].split(":")[0] in {"_JavaOutputError", "BrokenPipeError"}
    assert result["tokenizer"] == "none"


@pytest.mark.parametrize(
    "predictions, references, image_id",
    [
        ({"a": "x", "b": "y"}, {"a": ["x"]}, "b"),
        ({"a": "x"}, {"a": ["x"], "c": ["y"]}, "c"),
        ({"a": "x", "b": "y"}, {"a": ["x"], "b": []}, "b"),
    ],
    ids=["prediction-only", "reference-only", "empty-references"],
)
def test_bad_input_names_the_image(predictions, references, image_id):
    with pytest.raises(ValueError, match=repr(image_id)):
        compute_caption_metrics(predictions, references)


def test_simple_tokenize_drops_case_and_punctuation():
    assert simple_tokenize("  A Red-brick house, (near) the sea!  ") == "a red-brick house near the sea"


# ---------------------------------------------------------------------------------------------------------------
# CiderD


def random_corpus(seed: int = 0, num_images: int = 30, samples: int = 5):
    """References (1-5 per image, 3-9 words) and `samples` candidates per image (0-15 words) over 10 words."""
    rng = np.random.default_rng(seed)
    vocab = "a the red blue dog cat on under big small".split()

    def caption(low: int, high: int) -> str:
        return " ".join(rng.choice(vocab, rng.integers(low, high)))

    references = {f"img{i}": [caption(3, 10) for _ in range(rng.integers(1, 6))] for i in range(num_images)}
    rounds = [{image_id: caption(0, 16) for image_id in references} for _ in range(samples)]
    rounds[0].update(img0="dog dog dog dog dog dog", img1="a red a red a red a red", img2=references["img2"][0])
    return references, rounds


def test_cider_d_matches_pycocoevalcap():
    references, rounds = random_corpus()
    scorer = CiderD(references)
    for candidates in rounds:
        mean, expected = Cider().compute_score(references, {i: [c] for i, c in candidates.items()})
        scores = scorer.score(list(candidates.values()), list(candidates))
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
        assert scores.mean() == pytest.approx(mean, abs=1e-6)


def test_cider_d_scores_a_shuffled_batch_like_one_image_at_a_time():
    references, rounds = random_corpus(seed=1)
    scorer = CiderD(references)
    pairs = [(caption, image_id) for candidates in rounds for image_id, caption in candidates.items()]
    order = np.random.default_rng(0).permutation(len(pairs))
    captions, image_ids = zip(*(pairs[k] for k in order))
    batch = scorer.score(list(captions), list(image_ids))
    single = np.concatenate([scorer.score([c], [i]) for c, i in zip(captions, image_ids)])
    np.testing.assert_allclose(batch, single, rtol=0, atol=1e-12)


def test_cider_exact_match_positive_and_disjoint_zero():
    references = {k: [simple_tokenize(c) for c in refs] for k, refs in REFERENCES.items()}
    candidates = {"exact": references["exact"][0], "hand": "a man on a horse", "disjoint": "green tree"}
    _, expected = Cider().compute_score(references, {i: [c] for i, c in candidates.items()})
    scores = CiderD(references).score(list(candidates.values()), list(candidates))
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert scores[0] > scores[1] > 0
    assert scores[2] == 0


def test_cider_d_rejects_bad_input():
    with pytest.raises(ValueError, match="'b'"):
        CiderD({"a": ["a dog"], "b": []})
    scorer = CiderD({"a": ["a dog"], "b": ["a cat"]})
    with pytest.raises(ValueError, match="'c'"):
        scorer.score(["a dog"], ["c"])
    with pytest.raises(ValueError, match="2 candidates but 1 image ids"):
        scorer.score(["a dog", "a cat"], ["a"])


# ----------------------------------------------------------------------------------------------------------------
# Faithfulness on the scene world: CHAIR (Rohrbach et al., EMNLP 2018) and the error rates, on hand-made examples
from modeling_fsgr_pma.evaluation.faithfulness import (  # noqa: E402
    caption_mentions,
    caption_relations,
    faithfulness_metrics,
)


def _object(category, colour, size, group, salient, count=1, pattern="plain"):
    return {"category": category, "colour": colour, "size": size, "pattern": pattern, "group": group,
            "count": count, "salient": salient}  # fmt: skip


# Two brown dogs on (one instance) and next to (the other) a large green bench; a small green tree, left of the
# bench, that is not salient.
SCENE_OBJECTS = [
    _object("dog", "brown", "medium", 0, True, count=2), _object("dog", "brown", "medium", 0, True, count=2),
    _object("bench", "green", "large", 1, True), _object("tree", "green", "small", 2, False),
]  # fmt: skip
SCENE_RELATIONS = [
    {"subject": 0, "predicate": "on", "object": 2}, {"subject": 1, "predicate": "next to", "object": 2},
    {"subject": 2, "predicate": "next to", "object": 1}, {"subject": 3, "predicate": "left of", "object": 2},
]  # fmt: skip
HAND_CAPTIONS = {
    "right": "two brown dogs on a green bench",  # all correct, both salient objects named
    "cat": "a cat next to a large bench",  # cat hallucinated; its relation is not scored (no cat)
    "puppy": "a puppy beside a pine tree",  # synonym of dog with a wrong count; "pine tree" is not "tree"
    "colour": "a red bench to the right of a tree",  # wrong colour; inverse relation, true
    "relation": "a bench on two dogs",  # a false relation
}
# Mentions (distinct categories per caption) 2 + 2 + 2 + 2 + 2 = 10, hallucinated: cat, pine tree.
# Attributes stated on present categories: brown, green (right), large (cat), red (colour): 1 wrong of 4.
# Counts on present categories: two dogs, a bench (right), a bench (cat), a puppy (wrong: 2 dogs), a bench, a tree
# (colour), a bench, two dogs (relation): 1 wrong of 8. Relations between present categories: dog on bench (true),
# tree left of bench (true), bench on dog (false): 1 of 3. Salient categories named: 2 + 1 + 1 + 1 + 2 of 10.
HAND_EXPECTED = {
    "chair_i": 2 / 10, "chair_s": 2 / 5, "attribute_error_rate": 1 / 4, "count_error_rate": 1 / 8,
    "relation_error_rate": 1 / 3, "object_recall": 7 / 10, "mentions_per_caption": 10 / 5,
}  # fmt: skip


def test_chair_and_error_rates_on_hand_made_captions():
    objects = dict.fromkeys(HAND_CAPTIONS, SCENE_OBJECTS)
    relations = dict.fromkeys(HAND_CAPTIONS, SCENE_RELATIONS)
    result = faithfulness_metrics(HAND_CAPTIONS, objects, relations)
    assert result == pytest.approx(HAND_EXPECTED)
    alone = faithfulness_metrics({"cat": HAND_CAPTIONS["cat"]}, objects, relations)
    assert alone["chair_i"] == pytest.approx(1 / 2) and alone["chair_s"] == 1.0 and alone["relation_error_rate"] is None


def test_chair_counts_each_category_once_per_caption_and_none_without_mentions():
    objects = {"a": SCENE_OBJECTS, "b": SCENE_OBJECTS}
    result = faithfulness_metrics({"a": "a cat and two cats near a cat", "b": "nothing to see here"}, objects)
    assert result["chair_i"] == 1.0 and result["chair_s"] == 0.5 and result["relation_error_rate"] is None
    empty = faithfulness_metrics({"b": "nothing to see here"}, objects)
    assert empty["chair_i"] is None and empty["attribute_error_rate"] is None and empty["object_recall"] == 0.0


def test_caption_mentions_read_synonyms_counts_and_attributes():
    cups, plate = caption_mentions("a pair of small red polka dot mugs on top of a house plant")
    assert (cups.category, cups.count, cups.plural) == ("cup", 2, True)
    assert cups.attributes == [("size", "small"), ("colour", "red"), ("pattern", "spotted")]
    assert plate.category == "potted plant"  # the longest phrase wins: not a house
    assert caption_relations("a pair of small red polka dot mugs on top of a house plant") == [
        ("cup", "on", "potted plant")
    ]
    assert [(m.category, m.count) for m in caption_mentions("three gray kittens and some fish")] == [
        ("cat", 3), ("fish", None)
    ]
    assert caption_relations("a dog and a cat in a park") == []  # a list, not a relation
    assert caption_relations("a kite is flying above two dogs") == [("kite", "above", "dog")]
    assert caption_relations("two dogs below a kite") == [("kite", "above", "dog")]
