"""FSGR-PMA processor: a CLIP image processor and a `tokenizers`-backed caption tokenizer.

Remote code: imports only public packages.
"""

from __future__ import annotations

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from transformers import BatchFeature, CLIPImageProcessor, ProcessorMixin

from .configuration_fsgr_pma import FsgrPmaConfig


class FsgrPmaProcessor(ProcessorMixin):
    """Wraps a [`CLIPImageProcessor`] (resize, centre crop, CLIP normalisation) and a fast caption tokenizer.

    `processor(images=...)` gives `pixel_values`; `processor(text=...)` gives `input_ids` that start with BOS and
    end with EOS (the tokenizer's post-processor adds them); `processor.batch_decode(ids, skip_special_tokens=True)`
    turns generated ids back into captions. With both, the text is a caption *prefix* for `generate` to continue
    (this is how the `image-text-to-text` pipeline calls it).
    """

    def __init__(self, image_processor, tokenizer, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(self, images=None, text=None, return_tensors=None, **kwargs) -> BatchFeature:
        """Images → `pixel_values` `(B, 3, H, W)`; text → `input_ids` (and `attention_mask`) `(B, T)`.

        Text alone is whole captions, `<bos> … <eos>`, padded (`**kwargs` go to the tokenizer). Text with images is
        one caption prefix per image, `<bos> …` without EOS or mask, for `generate(**inputs)` to continue; the
        prefixes of one batch must tokenize to the same length (the decoder has no left padding). `""` means no
        prefix.
        """
        if images is None and text is None:
            raise ValueError("FsgrPmaProcessor needs `images`, `text`, or both")
        data = {}
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors))
        if text is not None and images is None:
            data.update(self.tokenizer(text, return_tensors=return_tensors, **kwargs))
        elif text is not None:
            prefixes = [text] if isinstance(text, str) else list(text)
            bos = self.tokenizer.bos_token_id
            ids = [[bos] + self.tokenizer(prefix, add_special_tokens=False)["input_ids"] for prefix in prefixes]
            if len({len(row) for row in ids}) > 1:
                raise ValueError(
                    f"Caption prefixes of one batch must have the same number of tokens, got {sorted({len(r) for r in ids})}"
                )
            if len(ids) != len(data["pixel_values"]):
                raise ValueError(f"{len(ids)} caption prefixes for {len(data['pixel_values'])} images")
            data["input_ids"] = ids
        return BatchFeature(data, tensor_type=return_tensors)

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
