"""One loader for captioning data in three layouts, with every image validated once (training-side code).

Layouts, detected from what is in `path` (Parquet files first, then `captions.json`):

1. **Parquet with images inside** (the synthetic world, HF Hub captioning datasets): `path/data/{split}-*.parquet`
   or `path/{split}-*.parquet` (or `{split}.parquet`) with columns `image` and `captions`, optionally `image_id`
   (made from the split and row number when missing), `objects` and `background` (kept: the synthetic world's
   ground truth).
2. **Karpathy-split COCO Parquet** (as the Hub's `yerevann/coco-karpathy`): the same file names, with columns
   `filepath` (e.g. `val2014`), `filename`, `cocoid` and `sentences` (strings, or Karpathy's `{"raw": ...}` dicts);
   the images live on disk under `image_root/filepath/filename`. `image_id` is the `cocoid`.
3. **A folder of images with `captions.json`**: either `{"file.jpg": ["caption", ...]}` or a list of records
   `{"file_name" (or "image"): ..., "captions": [...], "split" (optional), "image_id" (optional)}`, with file names
   relative to `path`. If no record has a `split`, the whole folder is the requested split, whatever its name; if
   every record has one, records are filtered by it; a mix is an error.

Split names: `validation` also matches files or records named `val` and `valid`.

Every image is decoded once when loading (`decode_image`, the same function a CLI uses): odd modes (L, LA, P,
RGBA, CMYK, I;16, ...) are converted to RGB (the converted rows are re-encoded as PNG, so the returned dataset
only ever holds RGB images); undecodable, empty, truncated and oversized files are skipped with a log line and a
final count (`bad_images="skip"`) or raise a `BadImageError` (a `ValueError`) naming the file and row
(`"error"`), so training never meets a bad image. A row without captions, or with an empty caption, is always a
`ValueError` naming the row.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Image, Sequence, Value, load_dataset
from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SPLIT_ALIASES = {"validation": ("validation", "val", "valid")}
COLUMNS = ("image_id", "image", "captions", "objects", "background")


class BadImageError(ValueError):
    """An image that cannot be used; the message names the file (or row) and the reason."""


# ----------------------------------------------------------------------------------------------------------------
# Images
def decode_image(
    source: bytes | str | Path | dict | PILImage.Image, name: str = "image", max_pixels: int | None = None
) -> PILImage.Image:
    """Decode an image and return it as a fully loaded 8-bit RGB PIL image (see `to_rgb` for the conversions).

    Args:
        source: encoded bytes, a file path, a `datasets` image dict (`{"bytes", "path"}`, bytes first) or a PIL
            image (only converted).
        name: how error messages name the image (a file name, a row id).
        max_pixels: larger images are refused; PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`)
            applies as well, so the effective limit is the smaller of the two.

    Raises:
        BadImageError: no data, missing or zero-byte file, not an image, truncated or corrupt, too many pixels, or a
            mode that cannot be converted to RGB.
    """
    return _decode(source, name, max_pixels)[0]


def to_rgb(image: PILImage.Image) -> PILImage.Image:
    """Convert any PIL mode to 8-bit RGB; RGB images are returned as they are.

    16-bit images (I;16*) are scaled by 1/257 (65535 → 255); 32-bit integer and float images (I, F) are stretched
    from their minimum to their maximum; images with transparency (RGBA, LA, PA, P with a transparent colour) are
    composited on white; every other mode (L, 1, P, CMYK, YCbCr, LAB, HSV) goes through PIL's own conversion.

    Raises:
        ValueError: PIL has no conversion from the image's mode to RGB.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        array = np.asarray(image).astype(np.float64) / 257  # (H, W) uint16 → [0, 255]
        return PILImage.fromarray(np.round(array).astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        return PILImage.fromarray(np.round(scaled).astype(np.uint8)).convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _decode(
    source: bytes | str | Path | dict | PILImage.Image, name: str, max_pixels: int | None
) -> tuple[PILImage.Image, str]:
    """`decode_image`, also returning the mode the image was stored in."""
    if isinstance(source, PILImage.Image):
        return _convert(source, name), source.mode
    data = _read_bytes(source, name)
    limits = [limit for limit in (max_pixels, PILImage.MAX_IMAGE_PIXELS) if limit is not None]
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; treat both as too large.
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            image = PILImage.open(io.BytesIO(data))
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as error:
        raise BadImageError(f"{name}: too large ({error})") from error
    except UnidentifiedImageError as error:
        raise BadImageError(f"{name}: not an image or unreadable header") from error
    except (OSError, SyntaxError, EOFError) as error:  # a header cut short
        raise BadImageError(f"{name}: truncated or corrupt ({error})") from error
    with image:
        if limits and image.width * image.height > min(limits):
            raise BadImageError(f"{name}: {image.width}×{image.height} pixels exceeds the limit of {min(limits)}")
        try:
            image.load()
        except (OSError, SyntaxError, EOFError, ValueError) as error:
            raise BadImageError(f"{name}: truncated or corrupt ({error})") from error
        return _convert(image, name), image.mode


def _read_bytes(source: bytes | str | Path | dict, name: str) -> bytes:
    if isinstance(source, dict):
        source = source["bytes"] if source.get("bytes") is not None else source.get("path")
    if source is None:
        raise BadImageError(f"{name}: no image data")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise BadImageError(f"{name}: file not found ({path})")
        source = path.read_bytes()
    if len(source) == 0:
        raise BadImageError(f"{name}: zero-byte file")
    return source


def _convert(image: PILImage.Image, name: str) -> PILImage.Image:
    try:
        return to_rgb(image)
    except ValueError as error:
        raise BadImageError(f"{name}: cannot convert mode {image.mode} to RGB ({error})") from error


def _png_bytes(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Layouts: each returns a Dataset with `image_id` (str), `image` (Image(decode=False)), `captions` [, `objects`].
def _aliases(split: str) -> tuple[str, ...]:
    return SPLIT_ALIASES.get(split, (split,))


def _parquet_files(path: Path, split: str) -> list[str]:
    for folder in (path / "data", path):
        for alias in _aliases(split):
            files = sorted(folder.glob(f"{alias}-*.parquet")) + sorted(folder.glob(f"{alias}.parquet"))
            if files:
                return [str(file) for file in files]
    return []


def _from_parquet(files: list[str], split: str, image_root: str | Path | None) -> Dataset:
    dataset = load_dataset("parquet", data_files={split: files}, split=split)
    columns = set(dataset.column_names)
    if {"image", "captions"} <= columns:
        return _from_hub_parquet(dataset, split)
    if {"filename", "sentences", "cocoid"} <= columns:
        return _from_karpathy(dataset, image_root)
    raise ValueError(
        f"Unrecognised Parquet columns {sorted(columns)} in {files[0]}: expected (image, captions) or Karpathy "
        "COCO's (filepath, filename, cocoid, sentences)"
    )


def _from_hub_parquet(dataset: Dataset, split: str) -> Dataset:
    if "image_id" not in dataset.column_names:
        dataset = dataset.add_column("image_id", [f"{split}-{i}" for i in range(len(dataset))])
    dataset = dataset.select_columns([c for c in COLUMNS if c in dataset.column_names])
    return dataset.cast_column("image_id", Value("string")).cast_column("image", Image(decode=False))


def _from_karpathy(dataset: Dataset, image_root: str | Path | None) -> Dataset:
    if image_root is None:
        raise ValueError("The Karpathy COCO layout keeps its images on disk: pass image_root (--image-root)")
    root = Path(image_root)
    folders = dataset["filepath"] if "filepath" in dataset.column_names else [""] * len(dataset)
    paths = [str(root / folder / name) for folder, name in zip(folders, dataset["filename"], strict=True)]
    captions = [[s["raw"] if isinstance(s, dict) else s for s in sentences] for sentences in dataset["sentences"]]
    return _records_dataset([str(i) for i in dataset["cocoid"]], paths, captions)


def _from_folder(path: Path, split: str) -> Dataset:
    entries = json.loads((path / "captions.json").read_text())
    if isinstance(entries, dict):
        entries = [{"file_name": name, "captions": captions} for name, captions in entries.items()]
    with_split = sum("split" in entry for entry in entries)
    if 0 < with_split < len(entries):
        raise ValueError(
            f"{path / 'captions.json'}: {with_split} of {len(entries)} records name a split; all or none must"
        )
    if with_split:
        entries = [entry for entry in entries if entry["split"] in _aliases(split)]
    names = [entry.get("file_name") or entry.get("image") for entry in entries]
    if None in names:
        raise ValueError(f"{path / 'captions.json'}: record {names.index(None)} has no file_name or image")
    ids = [str(entry.get("image_id", Path(name).stem)) for entry, name in zip(entries, names, strict=True)]
    return _records_dataset(ids, [str(path / name) for name in names], [entry.get("captions") for entry in entries])


def _records_dataset(ids: list[str], paths: list[str], captions: list) -> Dataset:
    features = Features(
        {"image_id": Value("string"), "image": Image(decode=False), "captions": Sequence(Value("string"))}
    )
    images = [{"bytes": None, "path": path} for path in paths]
    return Dataset.from_dict({"image_id": ids, "image": images, "captions": captions}, features=features)


# ----------------------------------------------------------------------------------------------------------------
# Loading
def load_caption_split(
    path: str | Path,
    split: str,
    image_root: str | Path | None = None,
    bad_images: str = "skip",
    max_pixels: int | None = None,
) -> Dataset:
    """Load one split as a `Dataset` with `image_id`, `image` (PIL RGB when read), `captions` (and the synthetic
    world's `objects` and `background`).

    Args:
        path: dataset directory in one of the three layouts of this module's docstring.
        split: `train`, `validation`, `test`, `test_novel`, ...
        image_root: image folder of the Karpathy COCO layout (unused by the others).
        bad_images: `"skip"` (log each bad image and the final count) or `"error"` (raise on the first).
        max_pixels: images with more pixels count as bad; see `decode_image`.

    Raises:
        ValueError: unknown layout or split, an empty split, a row without captions or with an empty caption.
        BadImageError: with `bad_images="error"`, the first unusable image.
    """
    if bad_images not in ("skip", "error"):
        raise ValueError(f"bad_images must be 'skip' or 'error', got {bad_images!r}")
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"Dataset directory {path} does not exist")
    files = _parquet_files(path, split)
    if files:
        dataset = _from_parquet(files, split, image_root)
    elif (path / "captions.json").is_file():
        dataset = _from_folder(path, split)
    else:
        raise ValueError(f"No split {split!r} in {path}: expected [data/]{split}-*.parquet or captions.json")
    if len(dataset) == 0:
        raise ValueError(f"Split {split!r} of {path} is empty")
    _check_captions(dataset)
    dataset = _validate_images(dataset, bad_images, max_pixels)
    logger.info("loaded %d %s images from %s", len(dataset), split, path)
    return dataset.cast_column("image", Image())


def _check_captions(dataset: Dataset) -> None:
    for image_id, captions in zip(dataset["image_id"], dataset["captions"], strict=True):
        if not captions:
            raise ValueError(f"Row {image_id!r} has no captions")
        if any(not caption or not caption.strip() for caption in captions):
            raise ValueError(f"Row {image_id!r} has an empty caption")


def _validate_images(dataset: Dataset, bad_images: str, max_pixels: int | None) -> Dataset:
    """Decode every image once; drop (or raise on) bad ones, re-encode non-RGB ones as RGB PNG."""
    keep, converted = [], {}
    rows = dataset.select_columns(["image_id", "image"])
    for index, row in enumerate(tqdm(rows, total=len(dataset), desc="checking images", leave=False)):
        name = f"{row['image']['path'] or 'embedded image'} (row {row['image_id']})"
        try:
            image, mode = _decode(row["image"], name, max_pixels)
        except BadImageError as error:
            if bad_images == "error":
                raise
            logger.warning("skipping %s", error)
            continue
        keep.append(index)
        if mode != "RGB":
            logger.debug("converted %s from %s to RGB", name, mode)
            converted[index] = _png_bytes(image)
    if converted:
        logger.info("converted %d of %d images to RGB", len(converted), len(dataset))

        def reencode(row: dict, index: int) -> dict:
            return {"image": {"bytes": converted.get(index, row["image"]["bytes"]), "path": row["image"]["path"]}}

        dataset = dataset.map(reencode, with_indices=True, features=dataset.features, desc="re-encoding as RGB")
    if len(keep) < len(dataset):
        logger.warning("skipped %d of %d images that could not be used", len(dataset) - len(keep), len(dataset))
        dataset = dataset.select(keep)
    return dataset
