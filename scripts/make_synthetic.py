"""Generate a synthetic captioning world, with no downloads: as Parquet (HF Hub layout) or as COCO's files.

Usage (from the repository root):

    python scripts/make_synthetic.py --output-dir outputs/scenes --num-images 2000 --seed 0
    python scripts/make_synthetic.py --layout coco-karpathy --output-dir outputs/coco-synthetic --num-images 2000
    python scripts/make_synthetic.py --domain synthetic --output-dir outputs/demo/data --num-images 2000 --seed 0

`--domain scenes` (default) is the world that resembles COCO (`modeling_fsgr_pma.data.scenes`, docs/synthetic-world.md):
49 object categories as composite icons in seven scene types, a long tail, counts, attributes and relations, five
captions per image from a grammar; splits `train`, `validation`, `test`, `test_novel` (held-out colour–category and
category–scene combinations) and `test_out_domain` (six categories never in the other splits); columns `image_id`,
`image`, `captions`, `objects`, `relations`, `scene`. `--clip-pretraining` lets the out-domain categories and the
held-out combinations into `train` (the tiny CLIP's pre-training set, never a captioning set). `--domain scenes-b`
is its second domain, for PEFT fine-tuning: every image holds one of those six categories (splits `train`,
`validation`, `test`).
`--domain synthetic` is the first world (7 shapes × 8 colours, with a tiny CLIP of its own), and
`--domain synthetic-b` its second domain (other shapes, colours and backgrounds) for PEFT fine-tuning; their splits are
`train`, `validation`, `test`, `test_novel` with columns `image_id`, `image`, `captions`, `objects`, `background`.

`--layout parquet` (default) writes `OUTPUT_DIR/data/{split}-00000-of-00001.parquet` and `OUTPUT_DIR/world.json`
(vocabulary, held-out combinations, counts). `--num-images` counts training images; every other split gets a tenth
of that (at least one). Read the result with `modeling_fsgr_pma.data.captions.load_caption_split(OUTPUT_DIR, split)`.

`--layout coco-karpathy` writes the same world as a COCO user has it: `dataset_coco.json` (Karpathy's splits
train/restval/val/test; `--num-images` = train + restval), JPEGs in `train2014/` and `val2014/` (640×480 by
default: `--image-size` is the short side) with `annotations/captions_val2014.json`, the COCO test server's
`test2014/` and `annotations/image_info_test2014.json`, and nocaps' `nocaps/{validation,test}/` with
`nocaps_val_4500_captions.json` and `nocaps_test_image_info.json` (see `generate_coco_world`). Read it with
`load_caption_split(OUTPUT_DIR / "dataset_coco.json", "train", image_root=OUTPUT_DIR)`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from modeling_fsgr_pma.data import scenes
from modeling_fsgr_pma.data.synthetic import DOMAINS, generate_coco_world, generate_world

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; errors exit before anything is written."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--layout", choices=["parquet", "coco-karpathy"], default="parquet")
    parser.add_argument("--num-images", type=int, default=2000, help="training images; other splits get 10%% each")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same files")
    parser.add_argument(
        "--image-size", type=int, default=None,
        help="side of the square images (parquet: 96 for scenes, 64 for the others) or short side of the 4:3 JPEGs "
        "(coco-karpathy, 480)",
    )  # fmt: skip
    parser.add_argument("--domain", choices=[scenes.DOMAIN, scenes.DOMAIN_B, *sorted(DOMAINS)], default=scenes.DOMAIN)
    parser.add_argument(
        "--clip-pretraining", action="store_true",
        help="scenes, parquet: out-domain categories and held-out combinations in train too (CLIP pre-training only)",
    )  # fmt: skip
    parser.add_argument("--num-workers", type=int, default=None, help="coco-karpathy: rendering processes")
    args = parser.parse_args(argv)
    if args.image_size is None:
        args.image_size = 480 if args.layout == "coco-karpathy" else (
            scenes.DEFAULT_IMAGE_SIZE if args.domain in (scenes.DOMAIN, scenes.DOMAIN_B) else 64
        )
    if args.clip_pretraining and (args.domain != scenes.DOMAIN or args.layout != "parquet"):
        parser.error("--clip-pretraining needs --domain scenes and --layout parquet")
    if args.domain == scenes.DOMAIN_B and args.layout != "parquet":
        parser.error("--domain scenes-b is written as Parquet only (--layout parquet)")
    if args.num_images < (1 if args.layout == "parquet" else 2):
        parser.error(f"--num-images must be at least {1 if args.layout == 'parquet' else 2} for --layout {args.layout}")
    if args.image_size < 16:
        parser.error("--image-size must be at least 16")
    if args.num_workers is not None and args.num_workers < 1:
        parser.error("--num-workers must be positive")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Generate the world; returns the content of `world.json`."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.layout == "coco-karpathy":
        world = generate_coco_world(
            args.output_dir, args.num_images, args.seed, args.image_size, args.domain, args.num_workers
        )
    elif args.domain in (scenes.DOMAIN, scenes.DOMAIN_B):
        world = scenes.generate_world(
            args.output_dir, args.num_images, args.seed, args.image_size, pretraining=args.clip_pretraining,
            domain=args.domain,
        )
    else:
        world = generate_world(args.output_dir, args.num_images, args.seed, args.image_size, args.domain)
    logger.info(
        "wrote the %s world (%s, seed %d, %d px) to %s: %s images",
        world["domain"], args.layout, world["seed"], world["image_size"], args.output_dir, world["counts"],
    )  # fmt: skip
    return world


if __name__ == "__main__":
    main()
