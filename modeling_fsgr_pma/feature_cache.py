"""Cached frozen-prefix features: the output of the vision blocks below `lora_first_block`, plus pseudo-labels.

Written by `scripts/extract_features.py`, read by `scripts/train.py`. Valid only for the same tower, the same
`lora_first_block` and the same codebook, and never with image augmentation (the cache holds one view per image).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .configuration_fsgr_pma import FsgrPmaConfig

MANIFEST = "cache.json"


def cache_key(config: FsgrPmaConfig) -> dict:
    """The config fields a cache depends on."""
    return {
        "clip_config": config.clip_config,
        "clip_pretrained": config.clip_pretrained,
        "lora_first_block": config.lora_first_block,
        "concept_names": config.concept_names,
    }


def save_feature_cache(directory: Path, split: str, image_ids: list[str], hidden: torch.Tensor, labels: torch.Tensor) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"vision_hidden_states": hidden.half().contiguous(), "patch_labels": labels.long().contiguous()}
    save_file(tensors, str(directory / f"{split}.safetensors"), metadata={"image_ids": json.dumps(image_ids)})


def write_manifest(directory: Path, config: FsgrPmaConfig) -> None:
    (directory / MANIFEST).write_text(json.dumps(cache_key(config), indent=2))


def load_feature_cache(directory: Path, split: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(image ids, `(N, 1 + n, d_v)` fp16 hidden states, `(N, n)` pseudo-labels) of one split."""
    path = Path(directory) / f"{split}.safetensors"
    if not path.is_file():
        raise ValueError(f"The feature cache {directory} has no split {split!r}: run scripts/extract_features.py")
    with safe_open(str(path), framework="pt") as file:
        ids = json.loads(file.metadata()["image_ids"])
        return ids, file.get_tensor("vision_hidden_states"), file.get_tensor("patch_labels")


def check_cache_matches(directory: Path, config: FsgrPmaConfig) -> None:
    """Raise a `ValueError` naming the first field where the cache and `config` disagree."""
    manifest = Path(directory) / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{directory} is not a feature cache (no {MANIFEST})")
    cached = json.loads(manifest.read_text())
    for field, value in cache_key(config).items():
        if cached.get(field) != value:
            raise ValueError(
                f"The feature cache in {directory} was made with a different {field}: "
                f"{str(cached.get(field))[:80]} != {str(value)[:80]}; re-run scripts/extract_features.py"
            )
