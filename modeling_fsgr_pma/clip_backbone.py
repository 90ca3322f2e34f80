"""open_clip models for the scripts: build from a config dict, load pretrained weights, embed the concept codebook.

Training-side code; building a model never touches the network, loading an open_clip pretrained tag does.
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

    A tag downloads the weights through open_clip (network needed); a path loads offline into `build_clip`.
    """
    if Path(pretrained).is_file():
        model = build_clip(clip_config)
        open_clip.load_checkpoint(model, pretrained)
        return model.eval()
    if clip_model_name is None:
        raise ValueError(f"{pretrained!r} is not a file, and a pretrained tag needs clip_model_name in the config")
    tags = open_clip.list_pretrained_tags_by_model(clip_model_name)
    if pretrained not in tags:
        raise ValueError(f"{pretrained!r} is neither a checkpoint file nor an open_clip tag of {clip_model_name} {tags}")
    logger.info("loading open_clip %s/%s (downloads the weights once)", clip_model_name, pretrained)
    return open_clip.create_model(clip_model_name, pretrained=pretrained).eval()


def clip_tokenizer(clip_config: dict):
    """CLIP's BPE tokenizer (the vocabulary ships inside open_clip) with the config's context length."""
    return open_clip.SimpleTokenizer(context_length=clip_config["text_cfg"].get("context_length", 77))


@torch.no_grad()
def embed_concepts(clip, tokenizer, names: list[str], templates=DEFAULT_TEMPLATES) -> torch.Tensor:
    """Prompt-ensembled concept embeddings `(N, d)`: the mean of normalised template embeddings, renormalised."""
    rows = []
    for name in names:
        tokens = tokenizer([template.format(name) for template in templates])
        embeddings = F.normalize(clip.encode_text(tokens).float(), dim=-1)  # (templates, d)
        rows.append(F.normalize(embeddings.mean(0), dim=-1))
    return torch.stack(rows)


def save_codebook(path: str | Path, embeddings: torch.Tensor, names: list[str]) -> None:
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
