"""Generate the bundled synthetic captioning world (Parquet, HF Hub layout), with no downloads.

Usage (from the repository root):

    python scripts/make_synthetic.py --output-dir outputs/demo/data --num-images 2000 --seed 0

Writes `OUTPUT_DIR/data/{train,validation,test,test_novel}-00000-of-00001.parquet` (columns `image_id`, `image`,
`captions`, `objects`) and `OUTPUT_DIR/world.json` (vocabulary, held-out colour–shape pairs, counts). `--num-images`
counts training images; validation, test and test_novel get a tenth of that each (at least one). `--domain
synthetic-b` makes the second domain (other shapes, colours and backgrounds) for PEFT fine-tuning. Read the result
with `modeling_fsgr_pma.data.load_caption_split(OUTPUT_DIR, split)`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from modeling_fsgr_pma.synthetic import DOMAINS, generate_world

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; errors exit before anything is written."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--num-images", type=int, default=2000, help="training images; other splits get 10%% each")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same files")
    parser.add_argument("--image-size", type=int, default=64, help="side of the square images in pixels")
    parser.add_argument("--domain", choices=sorted(DOMAINS), default="synthetic")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error("--num-images must be at least 1")
    if args.image_size < 16:
        parser.error("--image-size must be at least 16")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Generate the world; returns the content of `world.json`."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    world = generate_world(args.output_dir, args.num_images, args.seed, args.image_size, args.domain)
    logger.info(
        "wrote the %s world (seed %d, %d px) to %s: %s images, %d held-out pairs in test_novel",
        world["domain"],
        world["seed"],
        world["image_size"],
        args.output_dir,
        world["counts"],
        len(world["held_out_pairs"]),
    )
    return world


if __name__ == "__main__":
    main()
