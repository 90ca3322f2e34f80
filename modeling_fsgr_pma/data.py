"""One loader for captioning data in three layouts, with every image validated once (training-side code).

Layouts, detected from what is in `path`:

1. **Parquet with images inside** (the synthetic world, HF Hub captioning datasets): `path/data/{split}-*.parquet`
   or `path/{split}-*.parquet` with columns `image` and `captions` (and optionally `image_id`, `objects`).
2. **Karpathy-split COCO Parquet** (as the Hub's `yerevann/coco-karpathy`): Parquet files per split with columns
   `filepath`, `filename`, `cocoid` and `sentences`; the images live on disk under `image_root/filepath/filename`.
   The split `validation` also matches files named `val`.
3. **A folder of images with `captions.json`**: either `{"file.jpg": ["caption", ...]}` or a list of records
   `{"file_name": ..., "captions": [...], "split": ...}`. Records without a split belong to every split.

Every image is decoded once when loading: odd modes (L, LA, P, RGBA, CMYK, I;16, ...) are converted to RGB later
by `to_rgb`; undecodable, empty, truncated and oversized files are skipped with a log line and a count
(`bad_images="skip"`) or raise a `ValueError` naming the file (`"error"`). A row without captions, or with an
empty caption, is always an error naming the row.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Image, Sequence, Value, load_dataset
from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000  # about 8000 × 8000
SPLIT_ALIASES = {"validation": ("validation", "val", "valid"), "test": ("test",), "train": ("train",)}


class BadImageError(ValueError):
    """An image that cannot be used; the message names the file and the reason."""


# ----------------------------------------------------------------------------------------------------------------
# Images
def decode_image(source, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> PILImage.Image:
    """Decode `source` (bytes, a path, a datasets image dict or a PIL image) into an RGB PIL image.

    Raises:
        BadImageError: missing, empty, truncated, not an image, or more than `max_pixels` pixels.
    """
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, PILImage.Image):
        return to_rgb(source)
    if source is None:
        raise BadImageError(f"{name}: no image data")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise BadImageError(f"{name}: file not found ({path})")
        source = path.read_bytes()
    if len(source) == 0:
        raise BadImageError(f"{name}: zero-byte file")
    try:
        with PILImage.open(io.BytesIO(source)) as image:
            if image.width * image.height > max_pixels:
                raise BadImageError(f"{name}: {image.width}×{image.height} pixels exceeds the limit of {max_pixels}")
            image.load()
            return to_rgb(image)
    except UnidentifiedImageError as error:
        raise BadImageError(f"{name}: not an image ({error})") from error
    except PILImage.DecompressionBombError as error:
        raise BadImageError(f"{name}: too large ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, BadImageError):
            raise
        raise BadImageError(f"{name}: truncated or corrupt ({error})") from error


def to_rgb(image: PILImage.Image) -> PILImage.Image:
    """Convert any PIL mode to 8-bit RGB: 16/32-bit integer images are rescaled, alpha is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        return PILImage.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------------------------------
# Layouts
def _parquet_files(path: Path, split: str) -> list[str]:
    for folder in (path / "data", path):
        for alias in SPLIT_ALIASES.get(split, (split,)):
            files = sorted(folder.glob(f"{alias}-*.parquet")) + sorted(folder.glob(f"{alias}.parquet"))
            if files:
                return [str(f) for f in files]
    return []


def _from_parquet(files: list[str], image_root: str | None) -> Dataset:
    dataset = load_dataset("parquet", data_files={"split": files}, split="split")
    columns = set(dataset.column_names)
    if {"image", "captions"} <= columns:
        if "image_id" not in columns:
            dataset = dataset.add_column("image_id", [str(i) for i in range(len(dataset))])
        return dataset.cast_column("image", Image(decode=False))
    if {"filename", "sentences"} <= columns:
        if image_root is None:
            raise ValueError("The Karpathy COCO layout keeps images on disk: pass image_root (--image-root)")
        root = Path(image_root)
        rows = dataset.to_dict()
        paths = [
            str(root / folder / name) if folder else str(root / name)
            for folder, name in zip(rows.get("filepath", [""] * len(dataset)), rows["filename"])
        ]
        ids = [str(i) for i in rows.get("cocoid", rows["filename"])]
        captions = [[s["raw"] if isinstance(s, dict) else s for s in sentences] for sentences in rows["sentences"]]
        return _records_dataset(ids, [{"bytes": None, "path": p} for p in paths], captions)
    raise ValueError(
        f"Unrecognised Parquet columns {sorted(columns)}: expected (image, captions) or Karpathy COCO's "
        "(filepath, filename, cocoid, sentences)"
    )


def _from_folder(path: Path, split: str) -> Dataset:
    entries = json.loads((path / "captions.json").read_text())
    if isinstance(entries, dict):
        entries = [{"file_name": name, "captions": captions} for name, captions in entries.items()]
    ids, images, captions = [], [], []
    for entry in entries:
        if entry.get("split") not in (None, *SPLIT_ALIASES.get(split, (split,))):
            continue
        name = entry.get("file_name") or entry.get("image")
        ids.append(str(Path(name).stem if "image_id" not in entry else entry["image_id"]))
        images.append({"bytes": None, "path": str(path / name)})
        captions.append(entry.get("captions"))
    return _records_dataset(ids, images, captions)


def _records_dataset(ids: list[str], images: list[dict], captions: list) -> Dataset:
    features = Features({"image_id": Value("string"), "image": Image(decode=False), "captions": Sequence(Value("string"))})
    return Dataset.from_dict({"image_id": ids, "image": images, "captions": captions}, features=features)


# ----------------------------------------------------------------------------------------------------------------
def load_caption_split(
    path: str | Path,
    split: str,
    image_root: str | None = None,
    bad_images: str = "skip",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Dataset:
    """Load one split as a `Dataset` with `image_id`, `image` (decoded PIL), `captions` and, if present, `objects`.

    Args:
        path: dataset directory in one of the three layouts above.
        split: `train`, `validation`, `test`, `test_novel`, ...
        image_root: image folder of the Karpathy COCO layout.
        bad_images: `"skip"` (log and count) or `"error"` (raise on the first bad image).
        max_pixels: larger images count as bad.
    """
    if bad_images not in ("skip", "error"):
        raise ValueError(f"bad_images must be 'skip' or 'error', got {bad_images!r}")
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"Dataset directory {path} does not exist")
    files = _parquet_files(path, split)
    if files:
        dataset = _from_parquet(files, image_root)
    elif (path / "captions.json").is_file():
        dataset = _from_folder(path, split)
    else:
        raise ValueError(f"No split {split!r} in {path}: expected {split}-*.parquet (or data/) or captions.json")
    if len(dataset) == 0:
        raise ValueError(f"Split {split!r} of {path} is empty")
    _check_captions(dataset)
    keep = _usable_rows(dataset, bad_images, max_pixels)
    if len(keep) < len(dataset):
        dataset = dataset.select(keep)
    return dataset.cast_column("image", Image())


def _check_captions(dataset: Dataset) -> None:
    for image_id, captions in zip(dataset["image_id"], dataset["captions"]):
        if not captions:
            raise ValueError(f"Row {image_id!r} has no captions")
        if any(not caption or not caption.strip() for caption in captions):
            raise ValueError(f"Row {image_id!r} has an empty caption")


def _usable_rows(dataset: Dataset, bad_images: str, max_pixels: int) -> list[int]:
    keep, bad = [], 0
    rows = zip(dataset["image_id"], dataset["image"])
    for index, (image_id, image) in enumerate(tqdm(rows, total=len(dataset), desc="checking images", leave=False)):
        name = image.get("path") or image_id
        try:
            decode_image(image, name=f"{name} (row {image_id})", max_pixels=max_pixels)
        except BadImageError as error:
            if bad_images == "error":
                raise
            logger.warning("skipping %s", error)
            bad += 1
            continue
        keep.append(index)
    if bad:
        logger.warning("skipped %d of %d images that could not be used", bad, len(dataset))
    return keep
