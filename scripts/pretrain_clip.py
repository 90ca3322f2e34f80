"""Pre-train a tiny open_clip CLIP contrastively on the synthetic world, so its concept codebook means something.

Usage:

    python scripts/pretrain_clip.py --data outputs/demo/data --model-config configuration/model/tiny.json \
        --output outputs/demo/clip.pt

Only for the bundled synthetic world: real data starts from OpenAI's weights (`--clip-pretrained openai` in
training). The checkpoint is open_clip's format (`{"state_dict": ...}`), so training then loads it through the
same "pretrained CLIP" path (`open_clip.load_checkpoint`). Each step pairs every image with one of its captions
and minimises open_clip's `ClipLoss`; the log ends with image→text top-1 retrieval on the validation split.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm
from transformers import get_scheduler

from modeling_fsgr_pma import FsgrPmaConfig
from modeling_fsgr_pma.clip_backbone import build_clip, clip_tokenizer
from modeling_fsgr_pma.data import load_caption_split, to_rgb
from modeling_fsgr_pma.processing_fsgr_pma import clip_image_processor

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset directory (the synthetic world)")
    parser.add_argument("--model-config", type=Path, default=Path("configuration/model/tiny.json"))
    parser.add_argument("--output", type=Path, required=True, help="checkpoint file to write (.pt)")
    # Defaults: about 2 minutes on 2 CPU cores for a 2000-image world at 64 px with tiny.json.
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (10%% warm-up, cosine decay)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 2:
        parser.error("--epochs must be ≥ 1 and --batch-size ≥ 2 (the loss contrasts pairs within a batch)")
    if args.lr <= 0:
        parser.error("--lr must be positive")
    if not Path(args.data).exists():
        parser.error(f"--data {args.data} does not exist (make one with scripts/make_synthetic.py)")
    if not args.model_config.is_file():
        parser.error(f"--model-config {args.model_config} does not exist")
    return args


def pixel_tensor(image_processor, images) -> torch.Tensor:
    return image_processor([to_rgb(im) for im in images], return_tensors="pt")["pixel_values"]


@torch.no_grad()
def retrieval_accuracy(clip, tokenizer, pixels: torch.Tensor, captions: list[str]) -> float:
    """Image→text top-1 accuracy among the given (image, caption) pairs; an identical caption text counts as a hit."""
    clip.eval()
    image = torch.nn.functional.normalize(clip.encode_image(pixels), dim=-1)  # (N, d)
    text = torch.nn.functional.normalize(clip.encode_text(tokenizer(captions)), dim=-1)  # (N, d)
    retrieved = (image @ text.T).argmax(1).tolist()  # (N,)
    return sum(captions[j] == captions[i] for i, j in enumerate(retrieved)) / len(captions)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    config = FsgrPmaConfig.from_json_file(args.model_config)
    clip, tokenizer = build_clip(config.clip_config), clip_tokenizer(config.clip_config)
    image_processor = clip_image_processor(config)

    train = load_caption_split(args.data, "train")
    validation = load_caption_split(args.data, "validation")
    pixels = pixel_tensor(image_processor, train["image"])  # (N, 3, H, W), preprocessed once
    # Tokenize every reference caption once: one (captions of the image, context) tensor per image.
    captions = [tokenizer(list(refs)) for refs in train["captions"]]
    if len(train) < args.batch_size:
        raise ValueError(f"{len(train)} training images: fewer than one batch of {args.batch_size}")
    steps_per_epoch = len(train) // args.batch_size
    optimizer = torch.optim.AdamW(clip.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total_steps = args.epochs * steps_per_epoch
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=max(1, total_steps // 10), num_training_steps=total_steps)
    loss_fn = ClipLoss()

    clip.train()
    start = time.perf_counter()
    for epoch in range(args.epochs):
        rng = np.random.default_rng([args.seed, epoch])
        order = rng.permutation(len(train))
        losses = []
        for step in tqdm(range(steps_per_epoch), desc=f"epoch {epoch}", leave=False):
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            texts = torch.stack([captions[i][rng.integers(len(captions[i]))] for i in index])  # (B, context)
            image_features, text_features, logit_scale = clip(pixels[index], texts)
            loss = loss_fn(image_features, text_features, logit_scale)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        logger.info(
            "epoch %d: contrastive loss %.3f (%.0f s elapsed)", epoch, float(np.mean(losses)), time.perf_counter() - start
        )

    references = [refs[0] for refs in validation["captions"]]
    accuracy = retrieval_accuracy(clip, tokenizer, pixel_tensor(image_processor, validation["image"]), references)
    chance = sum(references.count(caption) for caption in references) / len(references) ** 2
    logger.info("validation image→text top-1: %.3f (chance %.3f)", accuracy, chance)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": clip.state_dict(), "epoch": args.epochs}, args.output)
    logger.info("saved %s", args.output)
    return {"retrieval_top1": accuracy}


if __name__ == "__main__":
    main()
