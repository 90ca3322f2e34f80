"""FSGR-PMA processor: a CLIP image processor and a `tokenizers`-backed caption tokenizer.

Remote code: imports only public packages.
"""

from __future__ import annotations

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from transformers import CLIPImageProcessor, ProcessorMixin

from .configuration_fsgr_pma import FsgrPmaConfig


class FsgrPmaProcessor(ProcessorMixin):
    """Wraps a [`CLIPImageProcessor`] (resize, centre crop, CLIP normalisation) and a fast caption tokenizer.

    `processor(images=...)` gives `pixel_values`; `processor(text=...)` gives `input_ids` that start with BOS and
    end with EOS (the tokenizer's post-processor adds them); `processor.batch_decode(ids, skip_special_tokens=True)`
    turns generated ids back into captions.
    """

    def __init__(self, image_processor, tokenizer, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def for_config(cls, config: FsgrPmaConfig, tokenizer):
        """A processor whose image size matches `config`, with the given caption tokenizer."""
        return cls(clip_image_processor(config), tokenizer)


def clip_image_processor(config: FsgrPmaConfig, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD):
    """Resize the short side to the tower's image size, centre-crop, normalise with CLIP's mean/std."""
    size = config.image_size
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(mean),
        image_std=list(std),
    )


FsgrPmaProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["FsgrPmaProcessor", "clip_image_processor"]
