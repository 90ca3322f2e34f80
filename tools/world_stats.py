"""Measure the scene world's properties (the numbers of docs/synthetic-world.md) for one seed, without writing it.

Usage:

    python tools/world_stats.py --num-images 2000 --seed 0 --output outputs/scenes/world_stats.json

Regenerates the `train` split exactly as `scripts/make_synthetic.py --num-images N --seed S` writes it (the same
scenes, renderings and captions: images are rendered, then dropped), and reports: category frequency (distinct
categories per image, the share of the 10 most frequent, the categories under 1 %), the same over the captions'
mentions, scene types and the smallest total-variation distance between two scene types' category distributions,
group counts, relations, caption structures (largest share), distinct words, and the references' own faithfulness
(zero errors by construction) and object recall.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

from modeling_fsgr_pma.data import scenes
from modeling_fsgr_pma.evaluation.faithfulness import caption_mentions, faithfulness_metrics

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=2000, help="training images, as make_synthetic.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=scenes.DEFAULT_IMAGE_SIZE)
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the measurements")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error("--num-images must be positive")
    return args


def tail_statistics(counter: Counter) -> dict:
    """Share of the 10 most frequent keys, and the keys under 1 % of the total."""
    total = sum(counter.values())
    ranked = counter.most_common()
    return {
        "distinct": len(counter),
        "top10_share": sum(n for _, n in ranked[:10]) / total,
        "under_1_percent": [key for key, n in ranked if n / total < 0.01],
        "shares": {key: round(n / total, 4) for key, n in ranked},
    }


def measure(num_images: int, seed: int, image_size: int) -> dict:
    groups, mentions, by_scene, counts, predicates = Counter(), Counter(), {}, Counter(), Counter()
    structures, words = Counter(), set()
    predictions, objects, relations = {}, {}, {}
    for index in range(num_images):
        record, rng = scenes.sample_example("train", index, seed)
        scenes.render_scene(record, image_size, rng)  # the draws rendering takes, so the captions are the stored ones
        captions = scenes.compose_captions(record, rng)
        per_group = {o["group"]: o for o in record["objects"]}
        groups.update(o["category"] for o in per_group.values())
        by_scene.setdefault(record["scene"]["type"], Counter()).update(o["category"] for o in per_group.values())
        counts.update(o["count"] for o in per_group.values())
        predicates.update(r["predicate"] for r in record["relations"])
        for name, caption in captions:
            structures[name] += 1
            words.update(word for word in caption.split() if word.isalpha())
            mentions.update({m.category for m in caption_mentions(caption)})
        for k, (_, caption) in enumerate(captions):
            predictions[f"{index}-{k}"] = caption
            objects[f"{index}-{k}"], relations[f"{index}-{k}"] = record["objects"], record["relations"]
    distances = {}
    names = sorted(by_scene)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pa = {k: v / sum(by_scene[a].values()) for k, v in by_scene[a].items()}
            pb = {k: v / sum(by_scene[b].values()) for k, v in by_scene[b].items()}
            distances[f"{a} / {b}"] = 0.5 * sum(abs(pa.get(k, 0) - pb.get(k, 0)) for k in set(pa) | set(pb))
    total_captions = sum(structures.values())
    return {
        "num_images": num_images, "seed": seed,
        "objects": tail_statistics(groups), "caption_mentions": tail_statistics(mentions),
        "scene_types": {name: sum(1 for _ in by_scene[name].elements()) for name in names},
        "scene_top_categories": {name: [k for k, _ in by_scene[name].most_common(5)] for name in names},
        "smallest_scene_distance": min(distances.items(), key=lambda item: item[1]),
        "group_counts": dict(sorted(counts.items())), "relations": dict(predicates.most_common()),
        "structures": {name: round(n / total_captions, 4) for name, n in structures.most_common()},
        "largest_structure_share": max(structures.values()) / total_captions,
        "distinct_words": len(words),
        "references_as_predictions": faithfulness_metrics(predictions, objects, relations),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    result = measure(args.num_images, args.seed, args.image_size)
    logger.info(
        "%d categories, top 10 %.3f, %d under 1%%; %d structures, largest %.3f; %d words; smallest scene distance %s",
        result["objects"]["distinct"], result["objects"]["top10_share"], len(result["objects"]["under_1_percent"]),
        len(result["structures"]), result["largest_structure_share"], result["distinct_words"],
        result["smallest_scene_distance"],
    )  # fmt: skip
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
