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
    def for_config(cls, config: FsgrPmaConfig, tokenizer, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD):
        """A processor whose image size matches `config` (CLIP's mean/std by default)."""
        size = config.image_size
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(mean),
            image_std=list(std),
        )
        return cls(image_processor, tokenizer)


FsgrPmaProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["FsgrPmaProcessor"]
