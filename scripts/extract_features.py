"""Cache the frozen part of the vision tower once: the blocks below `lora_first_block` (only the patch embedding when
the config has deep prompts, which every block sees), plus SupCon pseudo-labels.

Usage:

    python scripts/extract_features.py --model-config configuration/model/tiny.json \
        --clip-pretrained outputs/demo/clip.safetensors --codebook outputs/demo/codebook.safetensors \
        --data outputs/demo/data --splits train validation --output-dir outputs/demo/features

On GPUs, `accelerate launch scripts/extract_features.py ...` shares the shards between the processes.

Writes `OUTPUT_DIR/cache.json` (the settings the cache is valid for) and per split `OUTPUT_DIR/{split}/index.json`
plus shards of `--shard-size` images (`shard-00000.safetensors`, ...: `vision_hidden_states` `(N, 1 + n, d_v)` in
`--dtype`, int32 `patch_labels` `(N, n)`, image ids in the metadata; see `modeling_fsgr_pma.data.feature_cache`). Each
shard is complete or absent: run the same command again after a kill and it extracts only the missing shards.
`train.py --feature-cache OUTPUT_DIR` checks the settings, then skips the frozen blocks and the pseudo-label pass.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modeling_fsgr_pma import FsgrPmaConfig, FsgrPmaForConditionalGeneration
from modeling_fsgr_pma.training.clip_backbone import load_codebook, load_pretrained_clip, with_concepts
from modeling_fsgr_pma.data.captions import load_caption_split
from modeling_fsgr_pma.data.feature_cache import (
    DTYPES,
    MANIFEST,
    FeatureCacheWriter,
    bytes_per_image,
    check_cache_matches,
    write_manifest,
)
from modeling_fsgr_pma.processing_fsgr_pma import clip_image_processor

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", type=Path, required=True)
    parser.add_argument("--clip-pretrained", required=True, help="open_clip tag or checkpoint path")
    parser.add_argument("--codebook", type=Path, required=True)
    parser.add_argument("--data", required=True, help="dataset directory or JSON file (see modeling_fsgr_pma.data.captions)")
    parser.add_argument("--image-root", default=None)
    parser.add_argument("--splits", nargs="+", default=["train", "validation"])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard file")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="stored hidden states")
    parser.add_argument("--num-workers", type=int, default=4, help="data-loader processes decoding images")
    parser.add_argument("--lora-first-block", type=int, default=None, help="override the config's")
    args = parser.parse_args(argv)
    if not args.model_config.is_file():
        parser.error(f"--model-config {args.model_config} does not exist")
    if not args.codebook.is_file():
        parser.error(f"--codebook {args.codebook} does not exist: build it with scripts/build_codebook.py")
    if not Path(args.data).exists():
        parser.error(f"--data {args.data} does not exist")
    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.num_workers < 0:
        parser.error("--num-workers must be 0 (decode in this process) or more")
    if len(set(args.splits)) != len(args.splits):
        parser.error(f"--splits lists a split twice: {args.splits}")
    return args


def cache_config(args: argparse.Namespace, names: list[str]) -> FsgrPmaConfig:
    """The model config as training will build it (same codebook, CLIP weights and first LoRA block).

    Raises `ValueError` for a codebook whose concept count is not the config's `num_concepts`, and (from the config's
    validation) for a `--lora-first-block` outside the tower.
    """
    config = FsgrPmaConfig.from_json_file(args.model_config)
    overrides = {**with_concepts(config, names), "clip_pretrained": args.clip_pretrained}
    if args.lora_first_block is not None:
        overrides["lora_first_block"] = args.lora_first_block
    return FsgrPmaConfig(**{**config.to_dict(), **overrides})


class PixelCollator:
    """Dataset rows → `pixel_values` (a picklable collate function for data-loader workers)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, rows: list[dict]) -> torch.Tensor:
        return self.image_processor([row["image"] for row in rows], return_tensors="pt")["pixel_values"]


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    accelerator = Accelerator()
    codebook, names = load_codebook(args.codebook)
    config = cache_config(args, names)
    if (args.output_dir / MANIFEST).is_file():  # resuming: the shards already written must be of this setting
        check_cache_matches(args.output_dir, config, codebook, args.dtype)
    elif accelerator.is_main_process:
        write_manifest(args.output_dir, config, codebook, args.codebook, args.dtype)
    model = FsgrPmaForConditionalGeneration(config).eval()
    clip = load_pretrained_clip(config.clip_config, config.clip_model_name, args.clip_pretrained)
    model.load_clip_vision_weights(clip.visual.state_dict())
    model.set_codebook(codebook, names)
    encoder = model.encoder.to(accelerator.device)
    collate = PixelCollator(clip_image_processor(config))
    logger.info(f"{bytes_per_image(config, args.dtype) / 2**10:.1f} KiB per image in {args.dtype}")

    for split in args.splits:
        with accelerator.main_process_first():  # the main process validates and indexes the split once
            data = load_caption_split(args.data, split, args.image_root).select_columns(["image_id", "image"])
        with accelerator.main_process_first():  # and plans its shards; the others read the plan
            writer = FeatureCacheWriter(args.output_dir, split, list(data["image_id"]), args.shard_size, args.dtype)
        pending = writer.pending()
        mine = pending[accelerator.process_index :: accelerator.num_processes]
        logger.info(f"{split}: {len(pending)} of {writer.num_shards} shards to extract ({len(data)} images)")
        # One loader over this process's shards, each batch inside one shard: workers start once per split.
        batches, batch_shards = [], []
        for shard in mine:
            rows = writer.rows(shard)
            for start in range(rows.start, rows.stop, args.batch_size):
                batches.append(list(range(start, min(start + args.batch_size, rows.stop))))
                batch_shards.append(shard)
        loader = DataLoader(data, batch_sampler=batches, collate_fn=collate, num_workers=args.num_workers)
        hidden, labels = [], []
        progress = tqdm(total=len(mine), desc=f"caching {split}", disable=not accelerator.is_local_main_process)
        for i, pixels in enumerate(loader):
            prefix = encoder.tower.frozen_prefix(pixels.to(accelerator.device))  # (B, 1 + n, d_v)
            stored = prefix.to(DTYPES[args.dtype])
            hidden.append(stored.cpu())
            labels.append(encoder.pseudo_labels(stored.float()).cpu())  # labels from what training sees
            if i + 1 == len(batches) or batch_shards[i + 1] != batch_shards[i]:  # the shard is complete
                writer.write(batch_shards[i], torch.cat(hidden), torch.cat(labels))
                hidden, labels = [], []
                progress.update(1)
        progress.close()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for path in writer.remove_partial():
                logger.info(f"removed {path.name}, left by a killed extraction")
        logger.info(f"cached {len(data)} {split} images in {args.output_dir / split}")


if __name__ == "__main__":
    main()
