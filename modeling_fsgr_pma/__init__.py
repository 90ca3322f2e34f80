"""FSGR-PMA: a HuggingFace-native CLIP captioner with semantic quantisation and prototypical memory."""

from .configuration_fsgr_pma import FsgrPmaConfig
from .modeling_fsgr_pma import FsgrPmaForConditionalGeneration, FsgrPmaModel, FsgrPmaPreTrainedModel

__all__ = ["FsgrPmaConfig", "FsgrPmaForConditionalGeneration", "FsgrPmaModel", "FsgrPmaPreTrainedModel"]
