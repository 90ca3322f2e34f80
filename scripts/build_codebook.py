"""Build the frozen concept codebook: prompt-ensembled CLIP text embeddings of a concept vocabulary.

Usage:

    python scripts/build_codebook.py --model-config configuration/model/tiny.json \
        --clip-pretrained outputs/demo/clip.safetensors --vocabulary configuration/concepts/synthetic.txt \
        --output outputs/demo/codebook.safetensors

For COCO with OpenAI's ViT-B/16: `--model-config configuration/model/vit-b16.json --clip-pretrained openai
--vocabulary configuration/concepts/coco.txt`. Writes a safetensors file with the `(N, d_clip)` unit-norm
`codebook` and the concept names in its metadata; training reads both (the model config's `num_concepts` must equal the file's count).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from modeling_fsgr_pma import FsgrPmaConfig
from modeling_fsgr_pma.training.clip_backbone import DEFAULT_TEMPLATES, clip_tokenizer, embed_concepts, load_pretrained_clip, save_codebook

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", type=Path, required=True)
    parser.add_argument("--clip-pretrained", required=True, help="open_clip tag (e.g. openai) or checkpoint path")
    parser.add_argument("--vocabulary", type=Path, required=True, help="text file, one concept per line")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--templates", nargs="+", default=list(DEFAULT_TEMPLATES), help="prompts with one {}")
    args = parser.parse_args(argv)
    if not args.vocabulary.is_file():
        parser.error(f"--vocabulary {args.vocabulary} does not exist")
    if any("{}" not in template for template in args.templates):
        parser.error("every --templates entry needs a {} placeholder for the concept")
    return args


def read_vocabulary(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path} lists concepts more than once: {duplicates[:5]}")
    return names


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = FsgrPmaConfig.from_json_file(args.model_config)
    names = read_vocabulary(args.vocabulary)
    clip = load_pretrained_clip(config.clip_config, config.clip_model_name, args.clip_pretrained)
    embeddings = embed_concepts(clip, clip_tokenizer(config.clip_config), names, args.templates)
    save_codebook(args.output, embeddings, names)
    logger.info("codebook of %d concepts × %d dims written to %s", *embeddings.shape, args.output)
    return embeddings, names


if __name__ == "__main__":
    main()
