"""Cached frozen-prefix features: the output of the frozen vision blocks (`config.frozen_blocks`: those below
`lora_first_block`, or only the patch embedding with deep prompts), plus pseudo-labels.

Written by `scripts/extract_features.py`, read by `scripts/train.py`. Valid only for the same tower, the same
`lora_first_block` and deep prompts, the same codebook and `dense_attention` (the pseudo-labels), and never with
image augmentation (the cache holds one view per image).

Layout: `DIRECTORY/cache.json` (what the cache is valid for, `write_manifest`) and per split
`DIRECTORY/{split}/index.json` (the image ids in order and the shard size) with shards
`DIRECTORY/{split}/shard-{k:05d}.safetensors`, each holding `vision_hidden_states` `(N_k, 1 + n, d_v)` in float16
or bfloat16, int32 `patch_labels` `(N_k, n)` and its image ids in the metadata. A shard is written to a `.tmp`
file and renamed when complete, so an extraction killed at any point resumes with the shards still missing.

Reading copies the rows a batch needs, with one positioned read (`os.pread`) per row at the offset the shard's
safetensors header gives, so a training process's memory does not grow with the corpus. The pages read stay in
the kernel's page cache (shared by the processes of a node, reclaimed under pressure) without counting in the
process's RSS. Memory-mapping the shards (safetensors' `safe_open`) counts every mapped page in the RSS, which then
grows with the corpus: readahead maps far more than the rows read, and an epoch maps the whole cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..configuration_fsgr_pma import FsgrPmaConfig

MANIFEST = "cache.json"
INDEX = "index.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
LABEL_DTYPE = torch.int32
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32}


def codebook_hash(codebook: torch.Tensor) -> str:
    """SHA-256 of the codebook's float32 values (what `load_codebook` returns)."""
    return hashlib.sha256(codebook.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def cache_key(config: FsgrPmaConfig) -> dict:
    """The config fields a cache depends on (the frozen blocks, their weights, the image size, the codebook rows,
    the dense attention that labels the patches)."""
    return {
        "clip_config": config.clip_config,
        "image_size": config.image_size,
        "lora_first_block": config.lora_first_block,
        "num_prompt_tokens": config.num_prompt_tokens,
        "clip_pretrained": config.clip_pretrained,
        "concept_names": config.concept_names,
        "dense_attention": config.dense_attention,
    }


def bytes_per_image(config: FsgrPmaConfig, dtype: str = "float16") -> int:
    """Bytes one image takes in the cache: `(1 + n) × d_v` hidden values in `dtype` and `n` int32 labels."""
    value_bytes = torch.finfo(DTYPES[dtype]).bits // 8
    label_bytes = torch.iinfo(LABEL_DTYPE).bits // 8
    return (1 + config.num_patches) * config.vision_width * value_bytes + config.num_patches * label_bytes


def write_manifest(
    directory: str | Path, config: FsgrPmaConfig, codebook: torch.Tensor, codebook_path: str | Path, dtype: str
) -> None:
    """Write `cache.json`: `cache_key(config)`, the stored dtype, and the codebook's path and hash."""
    manifest = {
        **cache_key(config),
        "dtype": dtype,
        "codebook_path": str(Path(codebook_path).resolve()),
        "codebook_sha256": codebook_hash(codebook),
    }
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2))


def check_cache_matches(
    directory: str | Path, config: FsgrPmaConfig, codebook: torch.Tensor | None = None, dtype: str | None = None
) -> None:
    """Raise a `ValueError` naming the first field where the cache and `config` (and `codebook` and `dtype`, if
    given) disagree."""
    manifest = Path(directory) / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{directory} is not a feature cache (no {MANIFEST}): run scripts/extract_features.py")
    # older caches: MaskCLIP labels, no prompts
    cached = {"dense_attention": "maskclip", "num_prompt_tokens": 0, **json.loads(manifest.read_text())}
    expected = cache_key(config)
    if codebook is not None:
        expected["codebook_sha256"] = codebook_hash(codebook)
    if dtype is not None:
        expected["dtype"] = dtype
    for field, value in expected.items():
        if cached.get(field) != value:
            raise ValueError(
                f"The feature cache in {directory} was made with a different {field}: "
                f"{str(cached.get(field))[:80]} != {str(value)[:80]}; re-run scripts/extract_features.py"
            )


def _shard_path(split_dir: Path, shard: int) -> Path:
    return split_dir / f"shard-{shard:05d}.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# Writing
class FeatureCacheWriter:
    """Writes one split shard by shard; a new writer on the same plan finds the shards already done.

    Args:
        directory: the cache directory (`cache.json` lives there).
        split: the split's name; its shards go to `directory/split/`.
        image_ids: the images in the order they are cached.
        shard_size: images per shard (the last one may hold fewer).
        dtype: `"float16"` (10-bit mantissa: the default) or `"bfloat16"` (float32's range).

    Raises:
        ValueError: the split was planned before for other images, another shard size or another dtype.
    """

    def __init__(self, directory: str | Path, split: str, image_ids: list[str], shard_size: int, dtype: str):
        if shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.split_dir = Path(directory) / split
        self.image_ids, self.shard_size, self.dtype = list(image_ids), shard_size, dtype
        self.num_shards = -(-len(self.image_ids) // shard_size)
        plan = {"image_ids": self.image_ids, "shard_size": shard_size, "dtype": dtype, "num_shards": self.num_shards}
        index = self.split_dir / INDEX
        if index.is_file():
            planned = json.loads(index.read_text())
            for field in ("dtype", "shard_size", "image_ids"):
                if planned.get(field) != plan[field]:
                    raise ValueError(
                        f"{self.split_dir} was extracted with a different {field} (e.g. the dataset changed): delete "
                        "it or pass another --output-dir"
                    )
        else:
            self.split_dir.mkdir(parents=True, exist_ok=True)
            index.write_text(json.dumps(plan))

    def rows(self, shard: int) -> range:
        """The dataset rows shard `shard` holds."""
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(self.image_ids)))

    def pending(self) -> list[int]:
        """Shards not written yet (a `.tmp` left by a killed write does not count)."""
        return [shard for shard in range(self.num_shards) if not _shard_path(self.split_dir, shard).is_file()]

    def remove_partial(self) -> list[Path]:
        """Delete the `.tmp` files killed writes left (call it when no other process is writing this split)."""
        partial = sorted(self.split_dir.glob("shard-*.tmp"))
        for path in partial:
            path.unlink()
        return partial

    def write(self, shard: int, hidden: torch.Tensor, labels: torch.Tensor) -> Path:
        """Store shard `shard`: `hidden` `(N_k, 1 + n, d_v)` (any float dtype) and `labels` `(N_k, n)`.

        Raises:
            ValueError: wrong row count or shapes, or values float16 cannot hold (use bfloat16).
        """
        rows = self.rows(shard)
        if len(hidden) != len(rows) or len(labels) != len(rows):
            raise ValueError(f"shard {shard} holds {len(rows)} images, got {len(hidden)} hidden, {len(labels)} labels")
        if hidden.ndim != 3 or labels.shape != (hidden.shape[0], hidden.shape[1] - 1):
            raise ValueError(f"hidden states {tuple(hidden.shape)} and patch labels {tuple(labels.shape)} do not match")
        stored = hidden.to(DTYPES[self.dtype]).contiguous()
        if not torch.isfinite(stored).all():
            raise ValueError(f"shard {shard}: values outside {self.dtype}'s range; extract with --dtype bfloat16")
        tensors = {"vision_hidden_states": stored, "patch_labels": labels.to(LABEL_DTYPE).contiguous()}
        ids = self.image_ids[rows.start : rows.stop]
        final = _shard_path(self.split_dir, shard)
        partial = final.with_name(f"{final.name}.{os.getpid()}.tmp")
        save_file(tensors, str(partial), metadata={"image_ids": json.dumps(ids)})
        os.replace(partial, final)
        return final


# ----------------------------------------------------------------------------------------------------------------
# Reading
@dataclass(frozen=True)
class _RowLayout:
    """Where the rows of one tensor of a shard file are: row `i` is `row_bytes` bytes at `start + i * row_bytes`."""

    start: int
    row_bytes: int
    row_shape: tuple[int, ...]
    dtype: torch.dtype


def _shard_layout(path: Path) -> tuple[dict[str, _RowLayout], dict[str, str]]:
    """The row layout of every tensor of a safetensors file, and its metadata.

    The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length, a JSON
    header with each tensor's dtype, shape and `data_offsets` (from the end of the header), then the data.
    """
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
    metadata = header.pop("__metadata__", {})
    layouts = {}
    for name, tensor in header.items():
        begin, end = tensor["data_offsets"]
        rows, *row_shape = tensor["shape"]
        dtype = _SAFETENSORS_DTYPES[tensor["dtype"]]
        layouts[name] = _RowLayout(8 + length + begin, (end - begin) // rows, tuple(row_shape), dtype)
    return layouts, metadata


class FeatureCache:
    """One split of a cache: `image_ids`, `read(rows)`, and `aligned(ids)` for a data collator.

    Rows are read from the shard files when asked for (see the module docstring); the object pickles as its
    location, so a data-loader worker opens the shards itself.
    """

    def __init__(self, directory: str | Path, split: str):
        self.directory, self.split = Path(directory), split
        split_dir = self.directory / split
        if not (split_dir / INDEX).is_file():
            raise ValueError(f"The feature cache {directory} has no split {split!r}: run scripts/extract_features.py")
        index = json.loads((split_dir / INDEX).read_text())
        missing = [k for k in range(index["num_shards"]) if not _shard_path(split_dir, k).is_file()]
        if missing:
            raise ValueError(
                f"The feature cache {split_dir} is incomplete ({len(missing)} of {index['num_shards']} shards "
                "missing): run scripts/extract_features.py again to finish it"
            )
        self.image_ids: list[str] = index["image_ids"]
        self.shard_size: int = index["shard_size"]
        self._layouts: list[dict[str, _RowLayout]] = []
        for k in range(index["num_shards"]):
            layouts, metadata = _shard_layout(_shard_path(split_dir, k))
            if json.loads(metadata["image_ids"]) != self.image_ids[k * self.shard_size : (k + 1) * self.shard_size]:
                raise ValueError(f"{_shard_path(split_dir, k)} holds other images than {INDEX} lists: re-extract it")
            self._layouts.append(layouts)
        self._files = [open(_shard_path(split_dir, k), "rb", buffering=0) for k in range(index["num_shards"])]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "split": self.split}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"], state["split"])

    def read(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states `(len(rows), 1 + n, d_v)` in the stored dtype and int64 labels `(len(rows), n)`."""
        return self.gather("vision_hidden_states", rows), self.gather("patch_labels", rows)

    def gather(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        """Rows of `vision_hidden_states` (stored dtype) or `patch_labels` (int64), read from the shards."""
        first = self._layouts[0][name]  # every shard has the same row shape and dtype
        if len(rows) == 0:
            return torch.empty(0, *first.row_shape, dtype=first.dtype if name == "vision_hidden_states" else torch.long)
        buffer = bytearray(len(rows) * first.row_bytes)
        for i, row in enumerate(rows):
            shard, offset = divmod(int(row), self.shard_size)
            layout = self._layouts[shard][name]
            data = os.pread(self._files[shard].fileno(), layout.row_bytes, layout.start + offset * layout.row_bytes)
            if len(data) != layout.row_bytes:
                raise ValueError(f"{self._files[shard].name} is shorter than its header says: re-extract it")
            buffer[i * first.row_bytes : (i + 1) * first.row_bytes] = data
        gathered = torch.frombuffer(buffer, dtype=torch.uint8).view(first.dtype).view(len(rows), *first.row_shape)
        return gathered if name == "vision_hidden_states" else gathered.long()

    def aligned(self, image_ids: list[str]) -> dict[str, _AlignedColumn]:
        """`{"vision_hidden_states", "patch_labels"}`, each indexable by a dataset's row tensor (`column[rows]`).

        Raises:
            ValueError: an image id the cache does not hold.
        """
        position = {image_id: i for i, image_id in enumerate(self.image_ids)}
        missing = [image_id for image_id in image_ids if image_id not in position]
        if missing:
            raise ValueError(
                f"The feature cache {self.directory} has no features for {len(missing)} images, e.g. {missing[0]}"
            )
        order = np.array([position[image_id] for image_id in image_ids], dtype=np.int64)
        return {name: _AlignedColumn(self, order, name) for name in ("vision_hidden_states", "patch_labels")}


class _AlignedColumn:
    """One tensor of a `FeatureCache`, indexed by dataset row instead of cache row."""

    def __init__(self, cache: FeatureCache, order: np.ndarray, name: str):
        self.cache, self.order, self.name = cache, order, name

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return self.cache.gather(self.name, self.order[np.asarray(rows, dtype=np.int64)])


def load_feature_cache(directory: str | Path, split: str) -> FeatureCache:
    """Open one split of a cache (rows are read when asked for); a `ValueError` when it is missing or incomplete."""
    return FeatureCache(directory, split)
