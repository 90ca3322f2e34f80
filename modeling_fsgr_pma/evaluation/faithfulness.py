"""Faithfulness of captions to the synthetic scene world's ground truth: CHAIR, attribute, count and relation errors,
and object recall.

CHAIR (Rohrbach et al., "Object Hallucination in Image Captioning", EMNLP 2018,
https://github.com/LisaAnne/Hallucination): a caption's object mentions are found through per-category synonym lists
(here the world's lexicon, `modeling_fsgr_pma.data.scenes.CATEGORIES[...].nouns`, longest phrase first, so that
"pine tree" is not a "tree"); a mention is hallucinated when no object of its category is in the image.
`chair_i` = hallucinated mentions ÷ mentions (distinct categories per caption, pooled over captions), `chair_s` =
captions with a hallucinated mention ÷ captions.

The other rates read what a caption says about the objects it names correctly (the category is in the image):
- `attribute_error_rate`: colour, size and pattern words in a mention's noun phrase that no object of that category
  in the image has, ÷ such words;
- `count_error_rate`: stated counts ("two dogs", "a dog" = 1, "dogs" = at least 2) that differ from the number of
  objects of that category, ÷ stated counts;
- `relation_error_rate`: "X REL Y" statements between two present categories (left of, right of, above, below, on,
  next to, in front of, behind, with the lexicon's synonyms) that no pair of their objects holds, ÷ such statements;
- `object_recall`: salient objects' categories the caption names ÷ salient categories, pooled over images, so that
  short captions cannot look faithful.
Each rate is None when its denominator is zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from modeling_fsgr_pma.data.scenes import (
    CATEGORIES,
    COLOUR_WORDS,
    QUALITY_WORDS,
    INVERSE_RELATION_WORDS,
    NUMBER_WORDS,
    PATTERN_WORDS,
    RELATION_WORDS,
    SIZE_WORDS,
)

# word tuple → (category, plural); where both forms are one word ("fish") the singular wins and the count is read
# from the determiner alone
_NOUNS = {tuple(p.split()): (c.name, True) for c in CATEGORIES.values() for _, p in c.nouns}
_NOUNS |= {tuple(s.split()): (c.name, False) for c in CATEGORIES.values() for s, _ in c.nouns}
_LONGEST = max(len(phrase) for phrase in _NOUNS)
_COLOURS = {word: colour for colour, words in COLOUR_WORDS.items() for word in words}
_SIZES = {word: size for size, words in SIZE_WORDS.items() for word in words}
_PATTERNS = {word: pattern for pattern, words in PATTERN_WORDS.items() for word in words}
_EXACT = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_RELATIONS = sorted(
    [(tuple(w.split()), predicate, False) for predicate, words in RELATION_WORDS.items() for w in words]
    + [(tuple(w.split()), predicate, True) for predicate, words in INVERSE_RELATION_WORDS.items() for w in words],
    key=lambda entry: -len(entry[0]),
)  # (words, predicate, inverse), longest first: "on top of" before "on"
_QUALITY = {word for words in QUALITY_WORDS.values() for word in words}
_LIST_WORDS = {"and", "with", "along"}


@dataclass
class Mention:
    """One object mention: its category, stated count (None: "at least 2", or not stated), attributes and span."""

    category: str
    start: int  # first word of the noun phrase (its determiner or number)
    end: int  # one past the noun
    count: int | None = None
    plural: bool = False
    attributes: list[tuple[str, str]] = field(default_factory=list)  # (kind, value): ("colour", "red")


def _words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


def caption_mentions(caption: str) -> list[Mention]:
    """The object mentions of a caption, in order, with their noun phrases' counts and attributes."""
    words = _words(caption)
    mentions, i = [], 0
    while i < len(words):
        match = next((n for n in range(_LONGEST, 0, -1) if tuple(words[i : i + n]) in _NOUNS), None)
        if match is None:
            i += 1
            continue
        category, plural = _NOUNS[tuple(words[i : i + match])]
        start, attributes = i, []
        while start > 0:
            word = words[start - 1]
            if word in _COLOURS:
                attributes.append(("colour", _COLOURS[word]))
            elif word in _SIZES:
                attributes.append(("size", _SIZES[word]))
            elif word in _PATTERNS:
                attributes.append(("pattern", _PATTERNS[word]))
            elif word == "dot" and start >= 2 and words[start - 2] == "polka":
                attributes.append(("pattern", "spotted"))
                start -= 1
            elif word not in _QUALITY:
                break
            start -= 1
        count = None
        if start > 0 and words[start - 1] in _EXACT:
            count, start = _EXACT[words[start - 1]], start - 1
        elif start > 1 and words[start - 1] == "of" and words[start - 2] in ("pair", "couple"):
            count, start = 2, start - 2 - int(start > 2 and words[start - 3] == "a")
        if count is not None and count > 1:
            plural = True
        if count == 1 and plural:
            count = None
        mentions.append(Mention(category, start, i + match, count, plural, attributes[::-1]))
        i += match
    return mentions


def caption_relations(caption: str, mentions: list[Mention] | None = None) -> list[tuple[str, str, str]]:
    """(subject category, predicate, object category) statements: two consecutive mentions with a relation phrase
    ending the words between them ("a cat is sitting on a bench"); inverse wordings are turned round ("a bench
    below a cat" gives (cat, above, bench))."""
    words = _words(caption)
    mentions = caption_mentions(caption) if mentions is None else mentions
    statements = []
    for first, second in zip(mentions, mentions[1:]):
        gap = tuple(words[first.end : second.start])
        if _LIST_WORDS & set(gap) or len(gap) > 6:
            continue
        for phrase, predicate, inverse in _RELATIONS:
            if gap[len(gap) - len(phrase) :] == phrase and len(gap) >= len(phrase):
                subject, obj = (second, first) if inverse else (first, second)
                statements.append((subject.category, predicate, obj.category))
                break
    return statements


def faithfulness_metrics(
    predictions: dict[str, str], objects: dict[str, list[dict]], relations: dict[str, list[dict]] | None = None
) -> dict[str, float | None]:
    """CHAIR and the attribute, count and relation error rates and object recall of `predictions`, pooled.

    Args:
        predictions: image id → caption.
        objects: image id → the image's objects (`category`, `colour`, `size`, `pattern`, `salient`, `group`), one
            record per instance as the scene world stores them; must cover every prediction.
        relations: image id → `[{"subject", "predicate", "object"}]` over instance indices; None skips relations.

    Returns:
        `chair_i`, `chair_s`, `attribute_error_rate`, `count_error_rate`, `relation_error_rate`, `object_recall`,
        `mentions_per_caption`.
    """
    mentioned = hallucinated = bad_captions = 0
    attributes = bad_attributes = counts = bad_counts = stated = bad_relations = 0
    salient_total = salient_named = 0
    for image_id, caption in predictions.items():
        image_objects = objects[image_id]
        present = {o["category"] for o in image_objects}
        mentions = caption_mentions(caption)
        categories = {m.category for m in mentions}
        mentioned += len(categories)
        wrong = categories - present
        hallucinated += len(wrong)
        bad_captions += bool(wrong)
        salient = {o["category"] for o in image_objects if o["salient"]}
        salient_total += len(salient)
        salient_named += len(salient & categories)
        for mention in mentions:
            if mention.category not in present:
                continue
            instances = [o for o in image_objects if o["category"] == mention.category]
            for kind, value in mention.attributes:
                attributes += 1
                bad_attributes += all(o[kind] != value for o in instances)
            if mention.count is not None or mention.plural:
                counts += 1
                bad_counts += (len(instances) != mention.count) if mention.count is not None else len(instances) < 2
        if relations is not None:
            truth = {
                (image_objects[r["subject"]]["category"], r["predicate"], image_objects[r["object"]]["category"])
                for r in relations[image_id]
            }
            for subject, predicate, obj in caption_relations(caption, mentions):
                if subject in present and obj in present:
                    stated += 1
                    bad_relations += (subject, predicate, obj) not in truth

    def rate(numerator: int, denominator: int) -> float | None:
        return numerator / denominator if denominator else None

    return {
        "chair_i": rate(hallucinated, mentioned),
        "chair_s": rate(bad_captions, len(predictions)),
        "attribute_error_rate": rate(bad_attributes, attributes),
        "count_error_rate": rate(bad_counts, counts),
        "relation_error_rate": rate(bad_relations, stated) if relations is not None else None,
        "object_recall": rate(salient_named, salient_total),
        "mentions_per_caption": rate(mentioned, len(predictions)),
    }
