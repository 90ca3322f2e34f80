"""One loader for captioning data in five layouts, validated once and cached.

Layouts, detected from `path` (a directory: Parquet files first, then `dataset_coco.json`, then `captions.json`;
a file: the JSON's content):

1. **Parquet with images inside** (the synthetic world, HF Hub captioning datasets): `path/data/{split}-*.parquet`
   or `path/{split}-*.parquet` (or `{split}.parquet`) with columns `image` and `captions`, optionally `image_id`
   (made from the split and row number when missing), `objects`, `background`, `relations` and `scene` (kept: the
   synthetic worlds' ground truth).
2. **Karpathy-split COCO Parquet** (as the Hub's `yerevann/coco-karpathy`): the same file names, with columns
   `filepath` (e.g. `val2014`), `filename`, `cocoid` and `sentences` (strings, or Karpathy's `{"raw": ...}` dicts);
   the images live on disk under `image_root/filepath/filename`. `image_id` is the `cocoid`.
3. **Karpathy's `dataset_coco.json`** (what captioning codebases ship): `path` is the file, or a directory holding
   it; `images[]` with `filepath`, `filename`, `cocoid`, `split` and `sentences[].raw`; images under
   `image_root/filepath/filename` (`train2014/`, `val2014/`). Splits `train` (with `restval` folded in unless
   `fold_restval=False`: the 113,287 images every COCO paper trains on), `restval`, `val` (`validation`), `test`.
4. **COCO-format image info** (`path` is the JSON file): `images[]` with `id` and `file_name` (images under
   `image_root/file_name`), optionally `annotations[]` with `image_id` and `caption`, and a per-image `domain`
   (kept as a column). nocaps' `nocaps_val_4500_captions.json` and `nocaps_test_image_info.json`, COCO's
   `image_info_test2014.json` and `captions_val2014.json`. The file is the requested split, whatever its name.
   Test files have no captions: load them with `require_captions=False` (captioning for a server only).
5. **A folder of images with `captions.json`**: either `{"file.jpg": ["caption", ...]}` or a list of records
   `{"file_name" (or "image"): ..., "captions": [...], "split" (optional), "image_id" (optional)}`, with file names
   relative to `path`. If no record has a `split`, the whole folder is the requested split, whatever its name; if
   every record has one, records are filtered by it; a mix is an error.

Split names: `validation` also matches files, records or Karpathy entries named `val` and `valid`.

Validation and caching. Every image is decoded once (`decode_image`, the same function a CLI uses), in parallel
threads (Pillow releases the GIL while decoding). The result (an error, or the stored mode) is cached per image
with the file's size and modification time, in `cache_dir` (default: `fsgr_pma_index` in the `datasets` cache,
`HF_DATASETS_CACHE`); the next load only stats the files, revalidates the ones whose size or time changed, and
memory-maps the validated index from disk. The returned dataset holds paths (or the Parquet's bytes), never
decoded pixels: images are decoded when a row is read, so a data loader decodes lazily, in its workers.

Bad images: undecodable, empty, truncated, oversized or missing files are skipped with a log line naming the file
and row (the `BadImageError` that `decode_image` raises) and a final count, so training never meets one; a split
where no image exists at all (a wrong `image_root`) is a `ValueError` naming the first path looked for. Images come
out as RGB: modes PIL converts like `to_rgb` (L, P, CMYK, ...) are converted when read; 16-bit, 32-bit and
transparent images are converted with `to_rgb` once, at validation, and stored re-encoded as PNG. A row without
captions, or with an empty caption, is a `ValueError` naming the row.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, Features, Image, Sequence, Value, load_dataset, load_from_disk
from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SPLIT_ALIASES = {"validation": ("validation", "val", "valid")}
COLUMNS = ("image_id", "image", "captions", "objects", "background", "relations", "scene", "domain")
KARPATHY_FILE = "dataset_coco.json"
INDEX_VERSION = 1  # bump when the cached index's format or the validation changes
CHUNK = 2048  # images validated per round of the thread pool: memory stays flat in the number of images


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


def _needs_own_conversion(image: PILImage.Image) -> bool:
    """True when `to_rgb` differs from PIL's `convert("RGB")` (what the dataset's `Image(mode="RGB")` applies)."""
    if image.mode == "RGB":
        return False
    return image.mode.startswith("I;16") or image.mode in ("I", "F") or image.has_transparency_data


def _open(source: bytes | str | Path | dict, name: str, max_pixels: int | None) -> PILImage.Image:
    """Open and fully load an image in its stored mode; `BadImageError` for anything unusable."""
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
    if limits and image.width * image.height > min(limits):
        raise BadImageError(f"{name}: {image.width}×{image.height} pixels exceeds the limit of {min(limits)}")
    try:
        image.load()
    except (OSError, SyntaxError, EOFError, ValueError) as error:
        raise BadImageError(f"{name}: truncated or corrupt ({error})") from error
    return image


def _decode(
    source: bytes | str | Path | dict | PILImage.Image, name: str, max_pixels: int | None
) -> tuple[PILImage.Image, str]:
    """`decode_image`, also returning the mode the image was stored in."""
    if isinstance(source, PILImage.Image):
        return _convert(source, name), source.mode
    image = _open(source, name, max_pixels)
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
# Layouts: each returns a Dataset with `image_id` (str), `image` (Image(decode=False)), `captions` [, extras].
def _aliases(split: str) -> tuple[str, ...]:
    return SPLIT_ALIASES.get(split, (split,))


def _parquet_files(path: Path, split: str) -> list[Path]:
    for folder in (path / "data", path):
        for alias in _aliases(split):
            files = sorted(folder.glob(f"{alias}-*.parquet")) + sorted(folder.glob(f"{alias}.parquet"))
            if files:
                return files
    return []


@dataclass(frozen=True)
class _Layout:
    """Where a split comes from: its annotation files and how to read them into records."""

    sources: tuple[Path, ...]  # the files whose size and time key the cache
    read: Callable[[], Dataset]
    embedded: bool  # images are inside the source files (Parquet bytes), not paths on disk


def _find_layout(path: Path, split: str, image_root: str | Path | None, fold_restval: bool) -> _Layout:
    """The layout of `path` from file names only (nothing is parsed: a cached load never reads the annotations)."""
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"{path} is neither a dataset directory nor a JSON file (Karpathy or COCO format)")
        return _Layout((path,), lambda: _from_json(path, split, image_root, fold_restval), embedded=False)
    if not path.is_dir():
        raise ValueError(f"Dataset {path} does not exist")
    files = _parquet_files(path, split)
    if files:
        return _Layout(tuple(files), lambda: _from_parquet(files, split, image_root), embedded=True)
    if (path / KARPATHY_FILE).is_file():
        karpathy = path / KARPATHY_FILE
        return _Layout((karpathy,), lambda: _from_json(karpathy, split, image_root, fold_restval), embedded=False)
    if (path / "captions.json").is_file():
        return _Layout((path / "captions.json",), lambda: _from_folder(path, split), embedded=False)
    raise ValueError(
        f"No split {split!r} in {path}: expected [data/]{split}-*.parquet, {KARPATHY_FILE} or captions.json"
    )


def _from_parquet(files: list[Path], split: str, image_root: str | Path | None) -> Dataset:
    dataset = load_dataset("parquet", data_files={split: [str(f) for f in files]}, split=split)
    columns = set(dataset.column_names)
    if {"image", "captions"} <= columns:
        return _from_hub_parquet(dataset, split)
    if {"filename", "sentences", "cocoid"} <= columns:
        folders = dataset["filepath"] if "filepath" in columns else [""] * len(dataset)
        sentences = [[s["raw"] if isinstance(s, dict) else s for s in row] for row in dataset["sentences"]]
        return _on_disk(dataset["cocoid"], folders, dataset["filename"], sentences, image_root, "Karpathy COCO")
    raise ValueError(
        f"Unrecognised Parquet columns {sorted(columns)} in {files[0]}: expected (image, captions) or Karpathy "
        "COCO's (filepath, filename, cocoid, sentences)"
    )


def _from_hub_parquet(dataset: Dataset, split: str) -> Dataset:
    if "image_id" not in dataset.column_names:
        dataset = dataset.add_column("image_id", [f"{split}-{i}" for i in range(len(dataset))])
    dataset = dataset.select_columns([c for c in COLUMNS if c in dataset.column_names])
    return dataset.cast_column("image_id", Value("string")).cast_column("image", Image(decode=False))


def _from_json(path: Path, split: str, image_root: str | Path | None, fold_restval: bool) -> Dataset:
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    images = content.get("images") if isinstance(content, dict) else None
    if not images:
        raise ValueError(f"{path} has no `images` list: expected Karpathy's {KARPATHY_FILE} or COCO-format image info")
    if "sentences" in images[0]:
        return _from_karpathy_json(path, images, split, image_root, fold_restval)
    if "file_name" in images[0] and "id" in images[0]:
        return _from_coco_info(path, images, content.get("annotations", []), image_root)
    raise ValueError(
        f"{path}: images have neither Karpathy's (filepath, filename, cocoid, sentences) nor COCO's (id, file_name)"
    )


def _from_karpathy_json(
    path: Path, images: list[dict], split: str, image_root: str | Path | None, fold_restval: bool
) -> Dataset:
    wanted = set(_aliases(split)) | ({"restval"} if split == "train" and fold_restval else set())
    available = sorted({image["split"] for image in images})
    chosen = [image for image in images if image["split"] in wanted]
    if not chosen:
        raise ValueError(f"No split {split!r} in {path}: its splits are {available}")
    sentences = [[s["raw"] for s in image["sentences"]] for image in chosen]
    return _on_disk(
        [image["cocoid"] for image in chosen], [image.get("filepath", "") for image in chosen],
        [image["filename"] for image in chosen], sentences, image_root, "Karpathy COCO",
    )  # fmt: skip


def _from_coco_info(path: Path, images: list[dict], annotations: list[dict], image_root: str | Path | None) -> Dataset:
    captions: dict[int, list[str]] = {}
    for annotation in annotations:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    unknown = set(captions) - {image["id"] for image in images}
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} annotations name images not in `images`, e.g. {min(unknown)}")
    dataset = _on_disk(
        [image["id"] for image in images], [""] * len(images), [image["file_name"] for image in images],
        [captions.get(image["id"], []) for image in images], image_root, f"COCO-format {path.name}",
    )  # fmt: skip
    if all("domain" in image for image in images):  # nocaps: in-domain, near-domain, out-domain
        dataset = dataset.add_column("domain", [image["domain"] for image in images])
    return dataset


def _on_disk(
    ids: list, folders: list[str], names: list[str], captions: list, image_root: str | Path | None, layout: str
) -> Dataset:
    if image_root is None:
        raise ValueError(f"The {layout} layout keeps its images on disk: pass image_root (--image-root)")
    root = Path(image_root).resolve()  # the cached index must not depend on the working directory
    if not root.is_dir():
        raise ValueError(f"image_root {root} is not a directory")
    paths = [str(root / folder / name) for folder, name in zip(folders, names, strict=True)]
    return _records_dataset([str(i) for i in ids], paths, captions)


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
    max_pixels: int | None = None,
    require_captions: bool = True,
    fold_restval: bool = True,
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
) -> Dataset:
    """Load one split as a `Dataset` with `image_id`, `image` (PIL RGB when read), `captions` (and the synthetic
    world's `objects` and `background`).

    Args:
        path: dataset directory or JSON file in one of the layouts of this module's docstring.
        split: `train`, `validation`, `test`, `test_novel`, ...
        image_root: image folder of the layouts that keep images on disk (Karpathy COCO, COCO-format JSON).
        max_pixels: images with more pixels count as bad; see `decode_image`.
        require_captions: False accepts images without captions (test splits of evaluation servers); an empty
            caption string is an error either way.
        fold_restval: Karpathy's `restval` images belong to `train` (the standard 113,287-image training set).
        cache_dir: where validation results and the index are cached (default: `datasets`' cache).
        num_workers: threads that decode images during validation (default: the CPUs this process may use).

    Raises:
        ValueError: unknown layout or split, an empty split, a split whose images are all missing, a row without
            captions (with `require_captions`) or with an empty caption.
    """
    path = Path(path).resolve()
    layout = _find_layout(path, split, image_root, fold_restval)
    settings = {
        "version": INDEX_VERSION, "path": str(path), "split": split, "fold_restval": fold_restval,
        "image_root": str(Path(image_root).resolve()) if image_root is not None else None,
        "max_pixels": max_pixels, "require_captions": require_captions,
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    index = _SplitIndex(Path(cache_dir or Path(datasets.config.HF_DATASETS_CACHE) / "fsgr_pma_index") / key)
    workers = num_workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    dataset = index.load(layout, lambda data: _check_captions(data, require_captions), max_pixels, workers)
    _report_bad_images(index.errors)
    if len(dataset) == 0:
        raise ValueError(f"Split {split!r} of {path} is empty")
    logger.info("loaded %d %s images from %s", len(dataset), split, path)
    return dataset


def _check_captions(dataset: Dataset, require_captions: bool) -> None:
    for image_id, captions in zip(dataset["image_id"], dataset["captions"], strict=True):
        if not captions and require_captions:
            raise ValueError(f"Row {image_id!r} has no captions")
        if any(not caption or not caption.strip() for caption in captions or []):
            raise ValueError(f"Row {image_id!r} has an empty caption")


def _report_bad_images(errors: list[str | None]) -> None:
    """Log each bad image (its error names the file and row) and the count."""
    bad = [error for error in errors if error is not None]
    for error in bad:
        logger.warning("skipping %s", error)
    if bad:
        logger.warning("skipped %d of %d images that could not be used", len(bad), len(errors))


def _file_stat(path: str | None) -> tuple[int, int]:
    """(size, modification time in ns) of an image file; (-1, -1) when missing or embedded."""
    if path is None:
        return -1, -1
    try:
        stat = os.stat(path)
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def _validate(item: tuple[dict, str], max_pixels: int | None) -> tuple[str | None, str | None, bytes | None]:
    """(error or None, stored mode, PNG bytes when `to_rgb` must convert it) of one image; thread-safe."""
    source, name = item
    try:
        image = _open(source, name, max_pixels)
        converted = _convert(image, name)
    except BadImageError as error:
        return str(error), None, None
    return None, image.mode, _png_bytes(converted) if _needs_own_conversion(image) else None


# `save_to_disk` would copy the files an `Image` column points to into the index: it stores a plain struct instead.
_IMAGE_STRUCT = {"bytes": Value("binary"), "path": Value("string")}


def _save_index(dataset: Dataset, directory: Path) -> None:
    dataset.cast_column("image", _IMAGE_STRUCT).save_to_disk(str(directory))


def _load_index(directory: Path) -> Dataset:
    """The saved index, memory-mapped, with images decoded to RGB when a row is read."""
    return load_from_disk(str(directory)).cast_column("image", Image(mode="RGB"))


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _SplitIndex:
    """The cache of one split: validation results per image and, for on-disk images, the validated index.

    Files in `directory`: `state.json` (the source files' sizes and times; per row the image path, its size and
    time, the error or the stored mode) and `index-*` (the validated dataset, `save_to_disk`; on-disk images only:
    a Parquet layout's images stay in the Parquet, whose Arrow copy `datasets` caches itself). `state.json` is
    replaced atomically, after the index it names is complete.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.errors: list[str | None] = []  # per row of the split, before bad rows are dropped

    def load(self, layout: _Layout, check: Callable[[Dataset], None], max_pixels: int | None, workers: int) -> Dataset:
        """The validated split: from the cache when nothing changed, else (re)validating what did."""
        state = self._read_state()
        sources = [[str(source), *_file_stat(str(source))] for source in layout.sources]
        fresh = state is not None and state["sources"] == sources
        if fresh and not layout.embedded and (self.directory / str(state["index"])).is_dir():
            if self._stats(state["paths"], workers) == [tuple(stat) for stat in state["stats"]]:
                self.errors = state["errors"]
                return _load_index(self.directory / state["index"])
        records = layout.read()
        if len(records) == 0:
            return records  # nothing to validate or cache; the caller refuses an empty split
        if not fresh:
            check(records)
        image = records.data.column("image")  # Arrow struct<bytes, path>: read without copying the bytes
        embedded = pc.is_valid(pc.struct_field(image, "bytes")).to_pylist()
        paths = [None if inside else path for inside, path in zip(embedded, pc.struct_field(image, "path").to_pylist())]
        stats = self._stats(paths, workers)
        if not layout.embedded and stats and all(stat == (-1, -1) for stat in stats):
            raise ValueError(
                f"None of the {len(stats)} images exists, e.g. {paths[0]}: check image_root (--image-root)"
            )
        names = [f"{path or 'embedded image'} (row {i})" for path, i in zip(paths, records["image_id"], strict=True)]
        previous = self._reusable(state, fresh)
        results = self._validate_all(records, names, paths, stats, previous, max_pixels, workers)
        self.errors = [error for error, _, _ in results]
        dataset = self._validated(records, results)
        index_name = None
        if not layout.embedded:
            index_name = f"index-{os.getpid()}-{hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:12]}"
            _save_index(dataset, self.directory / index_name)
            dataset = _load_index(self.directory / index_name)
        self._write_state({
            "sources": sources, "index": index_name, "paths": paths, "stats": stats, "errors": self.errors,
            "modes": [mode for _, mode, _ in results], "reconvert": [png is not None for _, _, png in results],
        })  # fmt: skip
        return dataset

    def _read_state(self) -> dict | None:
        file = self.directory / "state.json"
        return json.loads(file.read_text()) if file.is_file() else None

    def _write_state(self, state: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f"state.json.{os.getpid()}.tmp"
        partial.write_text(json.dumps(state))
        os.replace(partial, self.directory / "state.json")
        for old in self.directory.glob("index-*"):  # indexes the state no longer names
            if old.name != state["index"]:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _stats(paths: list[str | None], workers: int) -> list[tuple[int, int]]:
        """`_file_stat` of every path, in threads (a network file system answers slowly), a chunk per task."""
        with ThreadPoolExecutor(workers) as pool:
            chunks = pool.map(lambda chunk: [_file_stat(path) for path in chunk], _chunks(paths, CHUNK))
            return [stat for chunk in chunks for stat in chunk]

    @staticmethod
    def _reusable(state: dict | None, fresh: bool) -> dict:
        """Cached results by path (files on disk, valid while their stat is unchanged) or by row (embedded images,
        valid while the source files are); images `to_rgb` converts are decoded again for their PNG bytes."""
        if state is None:
            return {}
        reusable = {}
        rows = zip(state["paths"], state["stats"], state["errors"], state["modes"], state["reconvert"], strict=True)
        for row, (path, stat, error, mode, reconvert) in enumerate(rows):
            if not reconvert and (path is not None or fresh):
                reusable[path if path is not None else row] = (tuple(stat), error, mode)
        return reusable

    @staticmethod
    def _validate_all(
        records: Dataset, names: list[str], paths: list, stats: list, reusable: dict, max_pixels, workers: int
    ) -> list[tuple[str | None, str | None, bytes | None]]:
        """Per row (error, mode, PNG bytes of a `to_rgb` conversion): cached where the file is unchanged."""
        results: list = [None] * len(records)
        todo = []
        for row, (path, stat) in enumerate(zip(paths, stats, strict=True)):
            cached = reusable.get(path if path is not None else row)
            if cached is not None and cached[0] == stat:
                results[row] = (cached[1], cached[2], None)
            else:
                todo.append(row)
        images = records.select_columns(["image"]).cast_column("image", Image(decode=False))
        with ThreadPoolExecutor(workers) as pool, tqdm(
            total=len(todo), desc="checking images", leave=False, disable=len(todo) < CHUNK
        ) as progress:
            for rows in _chunks(todo, CHUNK):  # one chunk of images in memory at a time
                items = [(source, names[row]) for source, row in zip(images.select(rows)["image"], rows, strict=True)]
                for row, result in zip(rows, pool.map(lambda item: _validate(item, max_pixels), items)):
                    results[row] = result
                progress.update(len(rows))
        return results

    @staticmethod
    def _validated(records: Dataset, results: list) -> Dataset:
        """Drop bad rows, store `to_rgb` conversions as PNG, and decode to RGB when read."""
        converted = sum(mode is not None and mode != "RGB" for _, mode, _ in results)
        if converted:
            logger.info("converted %d of %d images to RGB", converted, len(records))
        pngs = {row: png for row, (_, _, png) in enumerate(results) if png is not None}
        records = records.cast_column("image", Image(decode=False))
        if pngs:

            def reencode(row: dict, index: int) -> dict:
                return {"image": {"bytes": pngs.get(index, row["image"]["bytes"]), "path": row["image"]["path"]}}

            records = records.map(reencode, with_indices=True, features=records.features, desc="re-encoding as RGB")
        keep = [row for row, (error, _, _) in enumerate(results) if error is None]
        if len(keep) < len(records):
            records = records.select(keep)
        return records.cast_column("image", Image(mode="RGB"))


class CaptionPairs(torch.utils.data.Dataset):
    """Every (image, reference caption) pair of a split once: the XE epoch of the M² Transformer's data loader, which
    FSGR and PMA-Net train with (COCO Karpathy train + restval: 113,287 images, 566,747 pairs).

    Item `i` is the row of its image with `caption_index` added; the collator then uses that caption instead of
    drawing one. Rows are read lazily from the wrapped split: an image is decoded once per pair that uses it.
    """

    def __init__(self, images: Dataset):
        self.images = images
        counts = [len(captions) for captions in images["captions"]]
        self.pairs = [(row, index) for row, count in enumerate(counts) for index in range(count)]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        row, index = self.pairs[i]
        return {**self.images[row], "caption_index": index}
