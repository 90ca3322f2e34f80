"""Cached frozen-prefix features: the output of the vision blocks below `lora_first_block`, plus pseudo-labels.

Written by `scripts/extract_features.py`, read by `scripts/train.py`. Valid only for the same tower, the same
`lora_first_block` and the same codebook, and never with image augmentation (the cache holds one view per image).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .configuration_fsgr_pma import FsgrPmaConfig

MANIFEST = "cache.json"


def codebook_hash(codebook: torch.Tensor) -> str:
    """SHA-256 of the codebook's float32 values (what `load_codebook` returns)."""
    return hashlib.sha256(codebook.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def cache_key(config: FsgrPmaConfig) -> dict:
    """The config fields a cache depends on (the frozen blocks, their weights, the image size, the codebook rows)."""
    return {
        "clip_config": config.clip_config,
        "image_size": config.image_size,
        "lora_first_block": config.lora_first_block,
        "clip_pretrained": config.clip_pretrained,
        "concept_names": config.concept_names,
    }


def save_feature_cache(
    directory: str | Path, split: str, image_ids: list[str], hidden: torch.Tensor, labels: torch.Tensor
) -> None:
    """Write `directory/{split}.safetensors`: fp16 `vision_hidden_states` `(N, 1 + n, d_v)`, int64 `patch_labels` `(N, n)`."""
    if not len(image_ids) == len(hidden) == len(labels):
        raise ValueError(f"{len(image_ids)} image ids, {len(hidden)} hidden states and {len(labels)} label rows")
    if hidden.ndim != 3 or labels.shape != (hidden.shape[0], hidden.shape[1] - 1):
        raise ValueError(f"hidden states {tuple(hidden.shape)} and patch labels {tuple(labels.shape)} do not match")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"vision_hidden_states": hidden.half().contiguous(), "patch_labels": labels.long().contiguous()}
    save_file(tensors, str(directory / f"{split}.safetensors"), metadata={"image_ids": json.dumps(list(image_ids))})


def write_manifest(
    directory: str | Path, config: FsgrPmaConfig, codebook: torch.Tensor, codebook_path: str | Path
) -> None:
    """Write `cache.json`: `cache_key(config)` plus the codebook's path and hash."""
    manifest = {
        **cache_key(config),
        "codebook_path": str(Path(codebook_path).resolve()),
        "codebook_sha256": codebook_hash(codebook),
    }
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2))


def load_feature_cache(directory: str | Path, split: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(image ids, `(N, 1 + n, d_v)` fp16 hidden states, `(N, n)` int64 pseudo-labels) of one split."""
    path = Path(directory) / f"{split}.safetensors"
    if not path.is_file():
        raise ValueError(f"The feature cache {directory} has no split {split!r}: run scripts/extract_features.py")
    with safe_open(str(path), framework="pt") as file:
        ids = json.loads(file.metadata()["image_ids"])
        return ids, file.get_tensor("vision_hidden_states"), file.get_tensor("patch_labels")


def check_cache_matches(directory: str | Path, config: FsgrPmaConfig, codebook: torch.Tensor | None = None) -> None:
    """Raise a `ValueError` naming the first field where the cache and `config` (and `codebook`, if given) disagree."""
    manifest = Path(directory) / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{directory} is not a feature cache (no {MANIFEST}): run scripts/extract_features.py")
    cached = json.loads(manifest.read_text())
    expected = cache_key(config)
    if codebook is not None:
        expected["codebook_sha256"] = codebook_hash(codebook)
    for field, value in expected.items():
        if cached.get(field) != value:
            raise ValueError(
                f"The feature cache in {directory} was made with a different {field}: "
                f"{str(cached.get(field))[:80]} != {str(value)[:80]}; re-run scripts/extract_features.py"
            )
