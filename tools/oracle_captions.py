"""The oracle captioner of the scene world: captions written by the world's grammar from each image's true scene,
scored as `scripts/evaluate_captions.py` scores a model, to show how far above a model the references allow.

Usage:

    python scripts/make_synthetic.py --output-dir outputs/scenes --num-images 2000 --seed 0
    python tools/oracle_captions.py --data outputs/scenes --splits test test_novel test_out_domain \
        --output outputs/scenes/oracle.json

Two oracles, both from `modeling_fsgr_pma.data.scenes.oracle_captions` with their own seed: `sampled` writes one
caption per image (a sixth annotator who sees the true scene); `consensus` writes `--candidates` captions and keeps
the one most like the others (CIDEr-D among them, never against the references), as a model's beam search seeks the
mode. Their CHAIR and error rates are zero by construction (a check of the metrics), and their CIDEr-D is where a
perfect scene reader lands against these references. METEOR needs Java and SPICE is skipped offline (see
`modeling_fsgr_pma.evaluation.metrics`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from modeling_fsgr_pma.data.captions import load_caption_split
from modeling_fsgr_pma.data.scenes import oracle_captions
from modeling_fsgr_pma.evaluation.faithfulness import faithfulness_metrics
from modeling_fsgr_pma.evaluation.metrics import compute_caption_metrics

logger = logging.getLogger(__name__)
NAMES = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a scene world (make_synthetic.py --domain scenes)")
    parser.add_argument("--splits", nargs="+", default=["test", "test_novel", "test_out_domain"])
    parser.add_argument("--seed", type=int, default=0, help="the oracle's own randomness")
    parser.add_argument("--candidates", type=int, default=10, help="captions per image of the consensus oracle")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the scores")
    return parser.parse_args(argv)


def score_split(data: str, split: str, seed: int, candidates: int) -> dict:
    """The oracles' caption metrics and faithfulness on one split: `{"sampled": {...}, "consensus": {...}}`."""
    rows = load_caption_split(data, split).remove_columns("image")
    if "relations" not in rows.column_names:
        raise ValueError(f"{data} is not a scene world (no `relations` column); make it with --domain scenes")
    ids = list(rows["image_id"])
    records = {
        image_id: {"objects": objects, "relations": relations, "scene": scene}
        for image_id, objects, relations, scene in zip(ids, rows["objects"], rows["relations"], rows["scene"])
    }
    references = dict(zip(ids, rows["captions"]))
    results = {}
    for oracle, count in (("sampled", 1), ("consensus", candidates)):
        predictions = oracle_captions(records, seed, count)
        result = compute_caption_metrics(predictions, references, names=NAMES)
        result |= faithfulness_metrics(
            predictions, {i: r["objects"] for i, r in records.items()}, {i: r["relations"] for i, r in records.items()}
        )
        results[oracle] = result | {"num_images": len(ids), "examples": dict(list(predictions.items())[:5])}
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.candidates < 2:
        raise SystemExit("--candidates must be at least 2 (the consensus oracle chooses among them)")
    results = {split: score_split(args.data, split, args.seed, args.candidates) for split in args.splits}
    for split, oracles in results.items():
        for oracle, result in oracles.items():
            scores = ", ".join(f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float))
            logger.info("%s oracle on %s: %s", oracle, split, scores)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
