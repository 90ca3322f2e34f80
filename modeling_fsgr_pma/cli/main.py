"""Command-line interface for FSGR-PMA (the `fsgr-pma` console script).

Usage:
    fsgr-pma caption --model DIR_OR_REPO [--revision REV] [--adapter DIR] [--batch-size 16] [--num-beams N]
                     [--max-new-tokens N] [--json] [--device cpu|cuda] [--max-pixels N]
                     IMAGE_OR_DIR [IMAGE_OR_DIR ...]

    fsgr-pma explain IMAGE --model DIR_OR_REPO [--revision REV] [--adapter DIR] --output PNG [--max-new-tokens 20]
                     [--device cpu|cuda]

    python -m modeling_fsgr_pma.cli.main caption ...   (same thing without the installed script)

`caption` first prints (on stderr) what the model was trained on, from its model card (`README.md`, the "Training
data" section; `modeling_fsgr_pma.cli.loading.training_data`): a model only names what its training data shows, so
the demo model of the scene world describes any photo with its icons and scenes. It loads the model with
`AutoModel.from_pretrained(model, revision=..., trust_remote_code=True)` and the processor with `AutoProcessor`
(same arguments), expands directories (sorted, non-recursive; extensions .png .jpg .jpeg .bmp .gif .webp .tif
.tiff), applies EXIF orientation, converts every image to RGB and captions the good ones in batches, with the
model's `generation_config.json` (beam size, length, `no_repeat_ngram_size`) unless `--num-beams` or
`--max-new-tokens` say otherwise. `--adapter DIR` loads a PEFT adapter written by `scripts/finetune_peft.py` onto the model and merges it.

Output (stdout), one line per input file, in input order:
    PATH<TAB>CAPTION                    a captioned image
    PATH<TAB>ERROR: reason              a file that could not be used (missing, zero bytes, truncated, not an
                                        image, too large, ...)
  or with --json, one JSON object per line: {"file": PATH, "caption": ...} / {"file": PATH, "error": ...}.

Exit status: 0 every file was captioned; 1 at least one file failed (the others are still captioned); 2 usage
error, or the model/processor could not be loaded (a one-line message on stderr).

`explain` captions one image greedily and draws one figure (`modeling_fsgr_pma.cli.explain`): the cross-attention
heatmap of every generated word, the patch → concept map and the prototype memory's share of self-attention per
decoder layer. It prints the caption, then `wrote PNG`. Exit status: 0 written; 1 the image could not be used
(one line on stderr naming the file); 2 usage error, model/processor not loadable, or the figure not writable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .loading import ModelLoadError, load_pretrained, training_data

logger = logging.getLogger("fsgr_pma.cli")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
EXIT_OK, EXIT_FAILED_FILES, EXIT_USAGE = 0, 1, 2
_EXIF_ORIENTATION = 0x0112


class CliError(Exception):
    """A usage or model-loading problem: reported as one line on stderr, exit status 2."""


@dataclass
class Result:
    file: str
    caption: str | None = None
    error: str | None = None

    def line(self, as_json: bool) -> str:
        if as_json:
            record = {"file": self.file}
            record.update({"error": self.error} if self.error is not None else {"caption": self.caption})
            return json.dumps(record, ensure_ascii=False)
        return f"{self.file}\tERROR: {self.error}" if self.error is not None else f"{self.file}\t{self.caption}"


# ----------------------------------------------------------------------------------------------------------------
# Argument parsing
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsgr-pma", description="FSGR-PMA image captioning.", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    caption = subparsers.add_parser(
        "caption",
        help="caption images",
        description="Caption image files and directories of images; one output line per file, in input order. "
        "A model names only what its training data shows (the demo model: the synthetic scene world, so a photo "
        "gets a caption made of its categories and scenes); the first line, on stderr, says what the loaded model was trained on, "
        "from its model card (README.md, section 'Training data').",
    )
    caption.add_argument("--model", required=True, metavar="DIR_OR_REPO", help="a saved model directory or Hub id")
    caption.add_argument("--revision", default=None, metavar="REV", help="Hub revision (branch, tag or commit)")
    caption.add_argument("--adapter", default=None, metavar="DIR", help="PEFT adapter from scripts/finetune_peft.py")
    caption.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or directories")
    caption.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="images per batch (16)")
    caption.add_argument("--num-beams", type=_positive_int, default=None, metavar="N",
                         help="beam width (default: the model's generation_config.json)")
    caption.add_argument("--max-new-tokens", type=_positive_int, default=None, metavar="N",
                         help="caption limit (default: the model's generation_config.json)")
    caption.add_argument("--json", action="store_true", help="print one JSON object per line")
    caption.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(cpu)")
    caption.add_argument("--max-pixels", type=_positive_int, default=None, metavar="N", help="refuse larger images")
    caption.add_argument("-v", "--verbose", action="store_true", help="log progress details on stderr")
    caption.set_defaults(handler=caption_command)

    explain = subparsers.add_parser(
        "explain",
        help="draw what the model looked at for one caption",
        description="Caption one image greedily and write a PNG figure: a cross-attention heatmap per generated "
        "word, the patch-to-concept map, and the prototype memory's share of self-attention per decoder layer.",
    )
    explain.add_argument("image", metavar="IMAGE", help="an image file")
    explain.add_argument("--model", required=True, metavar="DIR_OR_REPO", help="a saved model directory or Hub id")
    explain.add_argument("--revision", default=None, metavar="REV", help="Hub revision (branch, tag or commit)")
    explain.add_argument("--adapter", default=None, metavar="DIR", help="PEFT adapter from scripts/finetune_peft.py")
    explain.add_argument("--output", required=True, metavar="PNG", help="where to write the figure (.png)")
    explain.add_argument("--max-new-tokens", type=_positive_int, default=20, metavar="N", help="caption limit (20)")
    explain.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(cpu)")
    explain.add_argument("-v", "--verbose", action="store_true", help="log progress details on stderr")
    explain.set_defaults(handler=explain_command)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Inputs
def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files as given; directories replaced by their image files (sorted by name, not recursive)."""
    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                child for child in path.iterdir() if child.is_file() and child.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                logger.warning("%s: directory has no image files (%s)", item, " ".join(IMAGE_EXTENSIONS))
            files.extend(str(child) for child in found)
        else:
            files.append(item)  # missing files are reported per file by load_image
    return files


def load_image(path: str, max_pixels: int | None):
    """Validate and decode with `decode_image`, then apply EXIF orientation (decode_image does not)."""
    from PIL import Image, ImageOps

    from ..data.captions import BadImageError, decode_image

    image = decode_image(path, name=path, max_pixels=max_pixels)  # raises BadImageError naming the file
    try:
        with Image.open(path) as raw:  # header only, unless the image must be rotated
            if raw.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None):
                image = decode_image(ImageOps.exif_transpose(raw), name=path)
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, BadImageError):
            raise
        logger.warning("%s: ignoring unreadable EXIF data (%s)", path, error)
    return image


def error_reason(error: Exception, path: str) -> str:
    """A `BadImageError`'s message without the file name it starts with: what `caption` prints after `ERROR: `."""
    message, prefix = str(error), f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


# ----------------------------------------------------------------------------------------------------------------
# Model
def load_model(model: str, revision: str | None, device: str, adapter: str | None = None):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda requested but CUDA is not available; use --device cpu")
    try:
        network, processor = load_pretrained(model, revision, adapter)
    except ModelLoadError as error:
        raise CliError(str(error)) from error
    return network.to(device), processor


def check_max_new_tokens(model, max_new_tokens: int) -> None:
    """The decoder reads BOS and every new token but the last: at most `max_position_embeddings` new tokens."""
    limit = model.config.max_position_embeddings
    if max_new_tokens > limit:
        raise CliError(f"--max-new-tokens {max_new_tokens} exceeds this model's limit of {limit} tokens")


# ----------------------------------------------------------------------------------------------------------------
# caption
def caption_images(model, processor, images: list, batch_size: int, num_beams: int, max_new_tokens: int, device):
    import torch
    from tqdm.auto import tqdm

    starts = range(0, len(images), batch_size)
    captions: list[str] = []
    with torch.inference_mode():
        for start in tqdm(starts, desc="captioning", unit="batch", file=sys.stderr, disable=len(starts) <= 1):
            inputs = processor(images=images[start : start + batch_size], return_tensors="pt").to(device)
            ids = model.generate(**inputs, num_beams=num_beams, max_new_tokens=max_new_tokens)
            captions.extend(text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True))
    return captions


def caption_command(args: argparse.Namespace) -> int:
    from ..data.captions import BadImageError

    files = expand_inputs(args.inputs)
    if not files:
        raise CliError("no image files found in the given inputs")
    model, processor = load_model(args.model, args.revision, args.device, args.adapter)
    generation = model.generation_config
    num_beams = args.num_beams or generation.num_beams or 1
    max_new_tokens = args.max_new_tokens or generation.max_new_tokens or 20
    check_max_new_tokens(model, max_new_tokens)
    print(f"fsgr-pma: {args.model} was trained on: {training_data(args.model, args.revision)}", file=sys.stderr)

    results = [Result(file=path) for path in files]
    good: list[tuple[int, object]] = []
    for index, path in enumerate(files):
        try:
            good.append((index, load_image(path, args.max_pixels)))
        except BadImageError as error:
            results[index].error = error_reason(error, path)
            logger.debug("skipping %s", error)

    if good:
        logger.info("captioning %d of %d files", len(good), len(files))
        captions = caption_images(
            model, processor, [image for _, image in good], args.batch_size, num_beams, max_new_tokens, args.device,
        )
        for (index, _), caption in zip(good, captions):
            results[index].caption = caption

    for result in results:
        print(result.line(args.json), flush=False)
    sys.stdout.flush()
    failed = sum(result.error is not None for result in results)
    if failed:
        logger.warning("%d of %d files could not be captioned", failed, len(files))
    return EXIT_FAILED_FILES if failed else EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# explain
def explain_command(args: argparse.Namespace) -> int:
    from ..data.captions import BadImageError
    from .explain import explain_image, plot_explanation

    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise CliError(f"--output must be a .png file, got {args.output}")
    try:  # the cheap check first: a bad image fails before the model loads
        image = load_image(args.image, max_pixels=None)
    except BadImageError as error:  # the message names the file
        print(f"fsgr-pma: error: {error}", file=sys.stderr)
        return EXIT_FAILED_FILES
    model, processor = load_model(args.model, args.revision, args.device, args.adapter)
    check_max_new_tokens(model, args.max_new_tokens)
    explanation = explain_image(model, processor, image, max_new_tokens=args.max_new_tokens)
    try:
        plot_explanation(explanation, output)
    except OSError as error:
        raise CliError(f"could not write {args.output}: {error.strerror or error}") from error
    print(explanation.caption)
    print(f"wrote {output}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: usage errors exit 2, --help exits 0
        return int(exit_.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="fsgr-pma: %(levelname)s: %(message)s"
    )
    try:
        return args.handler(args)
    except CliError as error:
        print(f"fsgr-pma: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
