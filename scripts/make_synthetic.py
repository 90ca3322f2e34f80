"""Generate the bundled synthetic captioning world (Parquet, HF Hub layout) — no downloads.

Usage:

    python scripts/make_synthetic.py --output-dir outputs/demo/data --num-images 2000 --seed 0

Writes `OUTPUT_DIR/data/{train,validation,test,test_novel}-00000-of-00001.parquet` (columns `image_id`,
`image`, `captions`, `objects`) and `OUTPUT_DIR/world.json` (vocabulary, held-out colour–shape pairs, counts).
`--domain synthetic-b` makes the second domain (other shapes, colours and backgrounds) for fine-tuning.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from modeling_fsgr_pma.synthetic import DOMAINS, generate_world

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--num-images", type=int, default=2000, help="training images; other splits get 10%% each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--domain", choices=sorted(DOMAINS), default="synthetic")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.image_size < 16:
        parser.error("--num-images must be ≥ 1 and --image-size ≥ 16")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    world = generate_world(args.output_dir, args.num_images, args.seed, args.image_size, args.domain)
    logger.info("synthetic world %s in %s: %s", args.domain, args.output_dir, world["counts"])
    return world


if __name__ == "__main__":
    main()
