"""Caption a split with a saved model, score it with the COCO caption metrics (offline), write the servers' file.

Usage:

    python scripts/evaluate_captions.py --model outputs/demo/model --data outputs/demo/data --split test \
        --output outputs/demo/metrics_test.json

COCO Karpathy test, and the files the COCO test server and nocaps (EvalAI) take (`[{"image_id": int, "caption":
str}]` with the ids of their image-info files; splits without captions are captioned, not scored):

    python scripts/evaluate_captions.py --model outputs/coco/model --data coco/dataset_coco.json --image-root coco \
        --split test --output outputs/coco/metrics_test.json --results-file outputs/coco/karpathy_test_results.json
    python scripts/evaluate_captions.py --model outputs/coco/model --data coco/annotations/image_info_test2014.json \
        --image-root coco/test2014 --split test --results-file outputs/coco/captions_test2014_fsgrpma_results.json
    python scripts/evaluate_captions.py --model outputs/coco/model --data nocaps/nocaps_val_4500_captions.json \
        --image-root nocaps/validation --split validation --output outputs/coco/metrics_nocaps_val.json \
        --results-file outputs/coco/nocaps_val_results.json

With `--adapter DIR` (a `scripts/finetune_peft.py` output) the adapter is loaded onto the model and merged first.

`--output` gets pycocoevalcap's metric names (`Bleu_1`..`Bleu_4`, `METEOR`, `ROUGE_L`, `CIDEr`, `SPICE`; a metric
whose Java part is missing is `null` with its reason under `skipped`), `CIDEr` and `SPICE` per nocaps `domain` under
`per_domain`, `reference_cross_entropy` (the teacher-forced loss of the reference captions, nats per token),
`repeated_trigram_rate` (the share of captions that say some three words twice, `a red ring, a red ring`), and the
faithfulness metrics when the data lists the objects in each image: on the scene world (`make_synthetic.py --domain
scenes`), CHAIR's `chair_i` and `chair_s`, `attribute_error_rate`, `count_error_rate`, `relation_error_rate`,
`object_recall` and `mentions_per_caption` (`modeling_fsgr_pma.evaluation.faithfulness`); on the shape worlds
(`synthetic`, `synthetic-b`), `hallucination_rate` split into `hallucination_wrong_shape`, `..._wrong_colour` and
`..._wrong_binding` with `objects_mentioned_per_caption`. A rate is `null` when its denominator is zero. Then the
decoding settings (`--num-beams`, `--max-new-tokens`, `--no-repeat-ngram-size`, `--repetition-penalty`; those not
given come from the model's `generation_config.json`), and every caption under `predictions`. A split without
reference captions gets no metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.utils.data import DataLoader

from modeling_fsgr_pma.data.captions import load_caption_split
from modeling_fsgr_pma.cli.loading import load_pretrained
from modeling_fsgr_pma.evaluation.faithfulness import faithfulness_metrics
from modeling_fsgr_pma.evaluation.metrics import compute_caption_metrics, simple_tokenize
from modeling_fsgr_pma.data.synthetic import hallucination_breakdown
from modeling_fsgr_pma.training.steps import CaptionCollator, generate_captions, reference_cross_entropy

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="directory (or Hub repo id) written by save_pretrained")
    parser.add_argument("--revision", default=None, help="Hub revision to load")
    parser.add_argument("--adapter", default=None, help="PEFT adapter directory from scripts/finetune_peft.py")
    parser.add_argument("--data", required=True, help="dataset directory (see modeling_fsgr_pma.data.captions)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--image-root", default=None)
    parser.add_argument("--output", type=Path, default=None, help="JSON file for metrics and predictions")
    parser.add_argument(
        "--results-file", type=Path, default=None,
        help='COCO-caption results file, [{"image_id": int, "caption": str}], for the COCO and nocaps servers',
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-beams", type=int, default=None, help="default: the model's generation config")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's generation config")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=None,
                        help="no n tokens twice in a caption (0: off); default: the generation config")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="divide the scores of tokens already generated (1.0: off); default: the generation config")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    args = parser.parse_args(argv)
    if args.output is None and args.results_file is None:
        parser.error("nothing to write: pass --output, --results-file or both")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator()
    model, processor = load_pretrained(args.model, args.revision, args.adapter)
    # A server's test split has no captions: it is captioned for the results file, and not scored.
    data = load_caption_split(args.data, args.split, args.image_root, require_captions=False)
    if args.max_images is not None:
        data = data.select(range(min(args.max_images, len(data))))
    image_ids = list(data["image_id"])
    references = dict(zip(image_ids, list(data["captions"])))
    scored = args.output is not None and reference_status(references)  # a results file alone is not scored
    if args.results_file is not None:
        server_ids(image_ids)  # fail before captioning when the ids cannot be the servers'
    data = data.add_column("row", list(range(len(data))))
    collator = CaptionCollator(processor, max_length=model.config.max_position_embeddings, with_captions=False)
    loader = accelerator.prepare(DataLoader(data, batch_size=args.batch_size, collate_fn=collator))
    model = accelerator.prepare(model)

    unwrapped = accelerator.unwrap_model(model)
    num_beams = args.num_beams or unwrapped.generation_config.num_beams
    max_new_tokens = args.max_new_tokens or unwrapped.generation_config.max_new_tokens
    repetition = {  # what the flags leave unset comes from generation_config.json, as in every other caller
        name: getattr(args, name) if getattr(args, name) is not None else getattr(unwrapped.generation_config, name)
        for name in ("no_repeat_ngram_size", "repetition_penalty")
    }
    predictions = generate_captions(
        accelerator, unwrapped, loader, processor.tokenizer, image_ids, num_beams=num_beams,
        max_new_tokens=max_new_tokens, **repetition,
    )
    reference_loss = reference_cross_entropy(
        accelerator, unwrapped, loader, processor.tokenizer, list(data["captions"]),
        unwrapped.config.max_position_embeddings,
    ) if scored else None
    if not accelerator.is_main_process:
        return {}
    if args.results_file is not None:
        write_results_file(args.results_file, image_ids, predictions)
        logger.info(f"wrote {len(image_ids)} captions to {args.results_file}")
    result = compute_caption_metrics(predictions, references) if scored else {}
    if scored:
        result["reference_cross_entropy"] = reference_loss
    if scored and "domain" in data.column_names:  # nocaps reports CIDEr and SPICE per domain
        domains = dict(zip(image_ids, list(data["domain"])))
        result["per_domain"] = {}
        for domain in sorted(set(domains.values())):
            ids = [image_id for image_id in image_ids if domains[image_id] == domain]
            scores = compute_caption_metrics(
                {i: predictions[i] for i in ids}, {i: references[i] for i in ids}, names=("CIDEr", "SPICE")
            )
            result["per_domain"][domain] = {"CIDEr": scores["CIDEr"], "SPICE": scores["SPICE"], "num_images": len(ids)}
    if "objects" in data.column_names:
        result |= object_faithfulness(predictions, image_ids, data)
    result.update(
        split=args.split,
        num_images=len(predictions),
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        no_repeat_ngram_size=repetition["no_repeat_ngram_size"] or 0,
        repetition_penalty=repetition["repetition_penalty"] or 1.0,
        repeated_trigram_rate=repeated_trigram_rate(predictions.values()),
        model=str(args.model),
        adapter=args.adapter,
        predictions=predictions,
    )
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
    scores = {k: v for k, v in result.items() if isinstance(v, float)}
    summary = ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) or "no reference captions, not scored"
    logger.info(f"{args.split}: {summary}")
    return result


def repeated_trigram_rate(captions) -> float:
    """The share of captions in which some three words (punctuation dropped) occur twice: `a red ring, a red ring`."""
    captions = list(captions)
    repeated = 0
    for caption in captions:
        words = simple_tokenize(caption).split()
        trigrams = list(zip(words, words[1:], words[2:]))
        repeated += len(trigrams) != len(set(trigrams))
    return repeated / max(len(captions), 1)


def object_faithfulness(predictions: dict[str, str], image_ids: list[str], data) -> dict:
    """CHAIR and the error rates on the scene world (objects with a `category`), the shape worlds' hallucination
    breakdown otherwise (objects with a `shape`)."""
    objects = dict(zip(image_ids, list(data["objects"])))
    if any(obj and "category" in obj[0] for obj in objects.values()):
        relations = dict(zip(image_ids, list(data["relations"]))) if "relations" in data.column_names else None
        return faithfulness_metrics(predictions, objects, relations)
    breakdown = hallucination_breakdown(predictions, objects)
    result = {key: value for key, value in breakdown.items() if key != "mentions"}
    return result | {"objects_mentioned_per_caption": breakdown["mentions"] / max(len(predictions), 1)}


def reference_status(references: dict[str, list[str]]) -> bool:
    """True when every image has reference captions (score them), False when none has (a server's test split).

    Raises:
        ValueError: some images have references and others not.
    """
    without = [image_id for image_id, captions in references.items() if not captions]
    if without and len(without) < len(references):
        raise ValueError(f"{len(without)} of {len(references)} images have no reference captions, e.g. {without[0]}")
    return not without


def server_ids(image_ids: list[str]) -> list[int]:
    """The integer image ids COCO-caption results files carry (COCO ids, Karpathy cocoids, nocaps ids).

    Raises:
        ValueError: an id that is not an integer (the dataset is not COCO-shaped).
    """
    bad = [image_id for image_id in image_ids if not image_id.isdigit()]
    if bad:
        raise ValueError(
            f"--results-file needs integer image ids (COCO, Karpathy or nocaps image info); {len(bad)} ids are not, "
            f"e.g. {bad[0]!r}"
        )
    return [int(image_id) for image_id in image_ids]


def write_results_file(path: Path, image_ids: list[str], predictions: dict[str, str]) -> None:
    """`[{"image_id": int, "caption": str}]` in the dataset's order, as the COCO and nocaps servers read it."""
    ids = zip(server_ids(image_ids), image_ids, strict=True)
    results = [{"image_id": int_id, "caption": predictions[image_id]} for int_id, image_id in ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
