"""Cache the frozen part of the vision tower once: the blocks below `lora_first_block`, plus SupCon pseudo-labels.

Usage:

    python scripts/extract_features.py --model-config configuration/model/tiny.json \
        --clip-pretrained outputs/demo/clip.pt --codebook outputs/demo/codebook.safetensors \
        --data outputs/demo/data --splits train validation --output-dir outputs/demo/features

Writes `OUTPUT_DIR/{split}.safetensors` (fp16 `vision_hidden_states` `(N, 1 + n, d_v)`, int64 `patch_labels`
`(N, n)`, image ids in the metadata) and `cache.json`, the settings the cache is valid for; `train.py
--feature-cache OUTPUT_DIR` checks them and then skips the frozen blocks and the pseudo-label pass.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeling_fsgr_pma import FsgrPmaConfig, FsgrPmaForConditionalGeneration
from modeling_fsgr_pma.clip_backbone import load_codebook, load_pretrained_clip
from modeling_fsgr_pma.data import load_caption_split, to_rgb
from modeling_fsgr_pma.feature_cache import MANIFEST, save_feature_cache, write_manifest
from modeling_fsgr_pma.processing_fsgr_pma import clip_image_processor

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", type=Path, required=True)
    parser.add_argument("--clip-pretrained", required=True, help="open_clip tag or checkpoint path")
    parser.add_argument("--codebook", type=Path, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--image-root", default=None)
    parser.add_argument("--splits", nargs="+", default=["train", "validation"])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lora-first-block", type=int, default=None, help="override the config's")
    args = parser.parse_args(argv)
    if not args.model_config.is_file():
        parser.error(f"--model-config {args.model_config} does not exist")
    if not args.codebook.is_file():
        parser.error(f"--codebook {args.codebook} does not exist: build it with scripts/build_codebook.py")
    if not Path(args.data).exists():
        parser.error(f"--data {args.data} does not exist")
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if len(set(args.splits)) != len(args.splits):
        parser.error(f"--splits lists a split twice: {args.splits}")
    return args


def cache_config(args: argparse.Namespace, names: list[str]) -> FsgrPmaConfig:
    """The model config as training will build it (same codebook, CLIP weights and first LoRA block).

    Raises `ValueError` (from the config's validation) for a `--lora-first-block` outside the tower.
    """
    config = FsgrPmaConfig.from_json_file(args.model_config)
    overrides = {
        "num_concepts": len(names),
        "concept_names": names,
        "concept_top_k": min(config.concept_top_k, len(names)),
        "clip_pretrained": args.clip_pretrained,
    }
    if args.lora_first_block is not None:
        overrides["lora_first_block"] = args.lora_first_block
    return FsgrPmaConfig(**{**config.to_dict(), **overrides})


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    codebook, names = load_codebook(args.codebook)
    config = cache_config(args, names)
    model = FsgrPmaForConditionalGeneration(config).eval()
    clip = load_pretrained_clip(config.clip_config, config.clip_model_name, args.clip_pretrained)
    model.load_clip_vision_weights(clip.visual.state_dict())
    model.set_codebook(codebook, names)
    image_processor = clip_image_processor(config)
    for split in args.splits:
        data = load_caption_split(args.data, split, args.image_root)
        hidden, labels = [], []
        for start in tqdm(range(0, len(data), args.batch_size), desc=f"caching {split}"):
            images = [to_rgb(im) for im in data[start : start + args.batch_size]["image"]]
            pixels = image_processor(images, return_tensors="pt")["pixel_values"]
            prefix = model.encoder.tower.frozen_prefix(pixels)  # (B, 1 + n, d_v)
            hidden.append(prefix.half())
            labels.append(model.encoder.pseudo_labels(prefix.half().float()))  # labels from what training sees
        save_feature_cache(args.output_dir, split, list(data["image_id"]), torch.cat(hidden), torch.cat(labels))
        logger.info("cached %d %s images in %s", len(data), split, args.output_dir)
    write_manifest(args.output_dir, config, codebook, args.codebook)
    logger.info("wrote %s", args.output_dir / MANIFEST)


if __name__ == "__main__":
    main()
