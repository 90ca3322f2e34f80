"""transformers' common tests (`ModelTesterMixin`, `ConfigTester`) of the pinned version, run against this model with
its memory empty and filled. The upstream files come from transformers' sdist (`upstream_transformers.py`); the tests
that do not apply to a captioner are skipped below, each with its reason."""

from __future__ import annotations

import unittest
from unittest import mock

import torch

import upstream_transformers
from conftest import random_batch, tiny_config
from modeling_fsgr_pma import FsgrPmaConfig, FsgrPmaForConditionalGeneration, FsgrPmaModel
from modeling_fsgr_pma.modeling_fsgr_pma import FsgrPmaPreTrainedModel

test_modeling_common, test_configuration_common = upstream_transformers.load()
ModelTesterMixin = test_modeling_common.ModelTesterMixin
ConfigTester = test_configuration_common.ConfigTester

NOT_APPLICABLE = {
    # inputs and outputs of text models
    "test_resize_embeddings_untied": "the LM head is tied to the word embeddings",
    "test_inputs_embeds": "the decoder takes token ids only (GPT-style captions; no inputs_embeds)",
    "test_inputs_embeds_matches_input_ids": "the decoder takes token ids only",
    "test_attention_outputs": (
        "the outputs carry `patch_concepts` besides Seq2SeqLMOutput's fields, so the tuple is one longer than the "
        "test counts; the attention shapes (prototype columns included) are checked in test_transformers_compat.py"
    ),
    "test_generation_tester_mixin_inheritance": (
        "transformers' sdist lacks tests/generation/ (GenerationTesterMixin); generation is tested in test_cache.py "
        "and test_modeling_fsgr_pma.py"
    ),
}


class FsgrPmaModelTester:
    """A tiny FSGR-PMA (hidden 32, 2 layers, image 32), as in `tests/conftest.py`."""

    def __init__(self, parent: unittest.TestCase, batch_size: int = 2, seq_length: int = 7):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = True
        config = self.get_config()
        self.hidden_size = config.hidden_size
        self.num_hidden_layers = config.num_hidden_layers
        self.num_attention_heads = config.num_attention_heads
        self.image_size = config.image_size
        self.encoder_seq_length = config.num_patches

    def get_config(self) -> FsgrPmaConfig:
        return tiny_config()

    def prepare_config_and_inputs_for_common(self) -> tuple[FsgrPmaConfig, dict]:
        config = self.get_config()
        pixel_values, ids = random_batch(config, batch=self.batch_size, length=self.seq_length)
        return config, {"pixel_values": pixel_values, "decoder_input_ids": ids}


def _fill_prototypes(model: FsgrPmaPreTrainedModel) -> None:
    """Seeded prototypes in every memory layer, made ready: a model whose memory was trained and refreshed."""
    generator = torch.Generator().manual_seed(0)
    for layer in model.memory_layers():
        if layer.prototype_keys.is_meta:  # built on the meta device by from_pretrained: loading fills it
            continue
        for buffer in (layer.prototype_keys, layer.prototype_values):
            buffer.copy_(torch.randn(buffer.shape, generator=generator).to(buffer))
        layer.prototype_ready.fill_(True)
        layer._is_ready()


class FsgrPmaModelTest(ModelTesterMixin, unittest.TestCase):
    """The common tests with the memory empty (a fresh model)."""

    all_model_classes = (FsgrPmaModel, FsgrPmaForConditionalGeneration)
    is_encoder_decoder = True
    test_resize_embeddings = False  # the vocabulary is the caption tokenizer's; the LM head is tied
    skipped = NOT_APPLICABLE

    def setUp(self):
        test_name = self._testMethodName
        if test_name in self.skipped:
            self.skipTest(self.skipped[test_name])
        self.model_tester = FsgrPmaModelTester(self)
        self.config_tester = ConfigTester(self, config_class=FsgrPmaConfig, has_text_modality=False)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is FsgrPmaForConditionalGeneration:
            inputs["labels"] = inputs["decoder_input_ids"].clone()  # the captioner shifts them itself
        return inputs

    # The training tests take `.loss`, which the bare model does not compute (transformers' own base models are left
    # out of them through MODEL_MAPPING_NAMES): they run on the captioner.
    def test_training(self):
        with mock.patch.object(self, "all_model_classes", (FsgrPmaForConditionalGeneration,)):
            super().test_training()

    def test_training_gradient_checkpointing(self):
        with mock.patch.object(self, "all_model_classes", (FsgrPmaForConditionalGeneration,)):
            super().test_training_gradient_checkpointing()

    def test_training_gradient_checkpointing_use_reentrant_false(self):
        with mock.patch.object(self, "all_model_classes", (FsgrPmaForConditionalGeneration,)):
            super().test_training_gradient_checkpointing_use_reentrant_false()

    def test_training_gradient_checkpointing_use_reentrant_true(self):
        with mock.patch.object(self, "all_model_classes", (FsgrPmaForConditionalGeneration,)):
            super().test_training_gradient_checkpointing_use_reentrant_true()

    def test_config(self):
        tester = self.config_tester
        tester.create_and_test_config_to_json_string()
        tester.create_and_test_config_to_json_file()
        tester.create_and_test_config_from_and_save_pretrained()
        tester.create_and_test_config_from_and_save_pretrained_subfolder()
        tester.create_and_test_config_with_num_labels()
        tester.check_config_can_be_init_without_params()
        # check_config_arguments_init needs tests/utils/test_configuration_utils.py, absent from the sdist


class FsgrPmaModelWithMemoryTest(FsgrPmaModelTest):
    """The common tests with every layer's prototype memory filled and active, as in a trained model."""

    built_filled = (
        "these models are built with a filled memory, while `_init_weights` (like loading a checkpoint without "
        "prototypes) gives an empty one by the loading contract; the empty-memory class runs this test"
    )
    skipped = {
        **NOT_APPLICABLE,
        "test_can_init_all_missing_weights": built_filled,
        "test_init_weights_can_init_buffers": built_filled,
    }

    def setUp(self):
        super().setUp()
        original = FsgrPmaPreTrainedModel.post_init

        def post_init_with_memory(model):
            original(model)
            _fill_prototypes(model)

        patcher = mock.patch.object(FsgrPmaPreTrainedModel, "post_init", post_init_with_memory)
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_models_are_built_with_an_active_memory(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            assert all(layer.memory_active for layer in model_class(config).memory_layers())
