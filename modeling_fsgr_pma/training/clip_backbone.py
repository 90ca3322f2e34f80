"""open_clip models for the scripts: build from a config dict, load pretrained weights, embed the concept codebook.

Building a model never touches the network, loading an open_clip pretrained tag does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..configuration_fsgr_pma import FsgrPmaConfig

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.", "a {} object.", "a picture with {}.")


def build_clip(clip_config: dict) -> open_clip.model.CLIP:
    """A randomly initialised open_clip CLIP from an open_clip model-config dict (no network)."""
    return open_clip.model.CLIP(
        embed_dim=clip_config["embed_dim"],
        vision_cfg=clip_config["vision_cfg"],
        text_cfg=clip_config["text_cfg"],
        quick_gelu=clip_config.get("quick_gelu", False),
    )


def load_pretrained_clip(clip_config: dict, clip_model_name: str | None, pretrained: str) -> open_clip.model.CLIP:
    """Load CLIP weights from a local open_clip checkpoint, or from an open_clip pretrained tag (e.g. "openai").

    A path loads offline into `build_clip(clip_config)` with `open_clip.load_checkpoint`. A tag goes through
    `open_clip.create_model(clip_model_name, pretrained=tag)`, which downloads the weights (network needed); the
    architecture must then be the one `clip_config` describes.

    Raises:
        ValueError: a missing checkpoint file, an unknown tag, or a `clip_model_name` that disagrees with `clip_config`.
        RuntimeError: the tag's weights could not be downloaded (no network, no local cache).
    """
    path = Path(pretrained)
    if path.is_file():
        model = build_clip(clip_config)
        open_clip.load_checkpoint(model, str(path))
        logger.info("loaded CLIP checkpoint %s", path)
        return model.eval()
    if path.suffix in {".pt", ".pth", ".bin", ".safetensors"} or len(path.parts) > 1:
        raise ValueError(f"CLIP checkpoint {pretrained} does not exist")
    if clip_model_name is None:
        raise ValueError(
            f"{pretrained!r} is not a checkpoint file, and loading an open_clip tag needs `clip_model_name` in the "
            "model config (e.g. \"ViT-B-16\")"
        )
    tags = open_clip.list_pretrained_tags_by_model(clip_model_name)
    if pretrained not in tags:
        raise ValueError(f"{pretrained!r} is neither a checkpoint file nor an open_clip tag of {clip_model_name} {tags}")
    _check_architecture(clip_config, clip_model_name)
    logger.info("loading open_clip %s/%s (downloads the weights once)", clip_model_name, pretrained)
    try:
        model = open_clip.create_model(
            clip_model_name, pretrained=pretrained, force_quick_gelu=bool(clip_config.get("quick_gelu", False))
        )
    except RuntimeError as error:  # open_clip wraps every failed download in a RuntimeError
        raise RuntimeError(
            f"Could not fetch open_clip weights {clip_model_name}/{pretrained} (network or Hugging Face cache "
            "needed); pass a local checkpoint path instead"
        ) from error
    return model.eval()


def _check_architecture(clip_config: dict, clip_model_name: str) -> None:
    """Fail early when the open_clip architecture named in the config is not the one `clip_config` describes."""
    reference = open_clip.get_model_config(clip_model_name)
    if reference is None:
        raise ValueError(f"open_clip has no architecture {clip_model_name!r}")
    mismatched = [key for key in ("embed_dim",) if reference.get(key) != clip_config.get(key)]
    for tower in ("vision_cfg", "text_cfg"):
        ours, theirs = clip_config.get(tower, {}), reference.get(tower, {})
        mismatched += [f"{tower}.{key}" for key in ours if key in theirs and ours[key] != theirs[key]]
    if mismatched:
        raise ValueError(f"clip_config disagrees with open_clip's {clip_model_name} on {mismatched}")


def clip_tokenizer(clip_config: dict) -> open_clip.SimpleTokenizer:
    """CLIP's BPE tokenizer (the vocabulary ships inside open_clip, offline) with the config's context length."""
    return open_clip.SimpleTokenizer(context_length=clip_config["text_cfg"].get("context_length", 77))


@torch.no_grad()
def embed_concepts(
    clip: open_clip.model.CLIP,
    tokenizer: open_clip.SimpleTokenizer,
    names: list[str],
    templates: tuple[str, ...] | list[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """Prompt-ensembled concept embeddings `(N, d)`: the mean of normalised template embeddings, renormalised.

    Args:
        names: N concept names; templates: prompts with one `{}` placeholder (CLIP's prompt ensembling).
    """
    if not names or not templates:
        raise ValueError("embed_concepts needs at least one concept name and one template")
    clip.eval()
    prompts = [template.format(name) for name in names for template in templates]  # N * T, name-major
    chunks = [
        F.normalize(clip.encode_text(tokenizer(prompts[start : start + batch_size])).float(), dim=-1)
        for start in range(0, len(prompts), batch_size)
    ]
    embeddings = torch.cat(chunks).view(len(names), len(templates), -1)  # (N, T, d)
    return F.normalize(embeddings.mean(1), dim=-1)  # (N, d)


def save_codebook(path: str | Path, embeddings: torch.Tensor, names: list[str]) -> None:
    """Write the `(N, d_clip)` codebook (key `codebook`) with the names as a JSON list in metadata `concept_names`."""
    if len(names) != len(embeddings):
        raise ValueError(f"{len(embeddings)} codebook rows but {len(names)} concept names")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"codebook": embeddings.contiguous()}, str(path), metadata={"concept_names": json.dumps(names)})


def load_codebook(path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """The `(N, d_clip)` codebook and its concept names from `scripts/build_codebook.py`'s safetensors file."""
    if not Path(path).is_file():
        raise ValueError(f"codebook {path} does not exist: build it with scripts/build_codebook.py")
    with safe_open(str(path), framework="pt") as file:
        names = json.loads(file.metadata()["concept_names"])
        embeddings = file.get_tensor("codebook")
    if len(names) != len(embeddings):
        raise ValueError(f"codebook {path} has {len(embeddings)} rows but {len(names)} concept names")
    return embeddings, names


def with_concepts(config: FsgrPmaConfig, names: list[str]) -> dict:
    """The config fields a codebook sets (its concept names); a `ValueError` when their count is not the config's
    `num_concepts`: the model is built for the vocabulary its preset names, never silently resized."""
    if len(names) != config.num_concepts:
        raise ValueError(
            f"The codebook holds {len(names)} concepts but the model config says num_concepts={config.num_concepts}: "
            f"build the codebook from the vocabulary the preset was written for (configuration/concepts/README.md), "
            f"or set num_concepts to {len(names)} in the model config"
        )
    return {"concept_names": list(names)}
