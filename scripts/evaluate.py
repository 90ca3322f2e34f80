"""Caption a split with a saved model and score it with the COCO caption metrics (offline).

Usage:

    python scripts/evaluate.py --model outputs/demo/model --data outputs/demo/data --split test \
        --output outputs/demo/metrics_test.json

With `--adapter DIR` (a `scripts/finetune_peft.py` output) the adapter is loaded onto the model and merged first.

Writes pycocoevalcap's metric names (`Bleu_1`..`Bleu_4`, `METEOR`, `ROUGE_L`, `CIDEr`, `SPICE`; a metric whose
Java part is missing is `null` with its reason under `skipped`), `reference_cross_entropy` (the teacher-forced loss
of the reference captions, nats per token), and, when the data lists the objects in each image (the synthetic
world), `hallucination_rate` split into `hallucination_wrong_shape`, `..._wrong_colour` and `..._wrong_binding`
(`null` when no caption names a known object) with `objects_mentioned_per_caption`; then the decoding settings,
and every caption under `predictions`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.utils.data import DataLoader

from modeling_fsgr_pma.data import load_caption_split
from modeling_fsgr_pma.loading import load_pretrained
from modeling_fsgr_pma.metrics import compute_caption_metrics
from modeling_fsgr_pma.synthetic import hallucination_breakdown
from modeling_fsgr_pma.training import CaptionCollator, generate_captions, reference_cross_entropy

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="directory (or Hub repo id) written by save_pretrained")
    parser.add_argument("--revision", default=None, help="Hub revision to load")
    parser.add_argument("--adapter", default=None, help="PEFT adapter directory from scripts/finetune_peft.py")
    parser.add_argument("--data", required=True, help="dataset directory (see modeling_fsgr_pma.data)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--image-root", default=None)
    parser.add_argument("--bad-images", choices=["skip", "error"], default="skip")
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-beams", type=int, default=None, help="default: the model's generation config")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's generation config")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator()
    model, processor = load_pretrained(args.model, args.revision, args.adapter)
    data = load_caption_split(args.data, args.split, args.image_root, args.bad_images)
    if args.max_images is not None:
        data = data.select(range(min(args.max_images, len(data))))
    data = data.add_column("row", list(range(len(data))))
    collator = CaptionCollator(processor, max_length=model.config.max_position_embeddings, with_captions=False)
    loader = accelerator.prepare(DataLoader(data, batch_size=args.batch_size, collate_fn=collator))
    model = accelerator.prepare(model)

    image_ids = list(data["image_id"])
    unwrapped = accelerator.unwrap_model(model)
    num_beams = args.num_beams or unwrapped.generation_config.num_beams
    max_new_tokens = args.max_new_tokens or unwrapped.generation_config.max_new_tokens
    predictions = generate_captions(
        accelerator, unwrapped, loader, processor.tokenizer, image_ids, num_beams=num_beams,
        max_new_tokens=max_new_tokens,
    )
    reference_loss = reference_cross_entropy(
        accelerator, unwrapped, loader, processor.tokenizer, list(data["captions"]),
        unwrapped.config.max_position_embeddings,
    )
    if not accelerator.is_main_process:
        return {}
    references = dict(zip(image_ids, list(data["captions"])))
    result = compute_caption_metrics(predictions, references)
    result["reference_cross_entropy"] = reference_loss
    if "objects" in data.column_names:
        breakdown = hallucination_breakdown(predictions, dict(zip(image_ids, list(data["objects"]))))
        result |= {key: value for key, value in breakdown.items() if key != "mentions"}
        result["objects_mentioned_per_caption"] = breakdown["mentions"] / max(len(predictions), 1)
    result.update(
        split=args.split,
        num_images=len(predictions),
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        model=str(args.model),
        adapter=args.adapter,
        predictions=predictions,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    scores = {k: v for k, v in result.items() if isinstance(v, float)}
    logger.info(f"{args.split}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    return result


if __name__ == "__main__":
    main()
