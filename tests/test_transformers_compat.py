"""A transformers citizen (issue 12): output flags, return_dict, attention implementations, export and compile,
meta-device init, incomplete checkpoints (initialised and named, as in transformers), gradients of an empty memory. Each test runs with the memory empty and
filled where the two differ."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel
from transformers.testing_utils import CaptureLogger
from transformers.utils.loading_report import update_key_name
from transformers.utils import logging as transformers_logging

from conftest import fill_memory, random_batch, randomise_lora, tiny_model
from modeling_fsgr_pma import FsgrPmaForConditionalGeneration, FsgrPmaModel

MEMORY = pytest.mark.parametrize("memory", ["empty", "filled"])


def _model(memory: str, **overrides) -> FsgrPmaForConditionalGeneration:
    model = tiny_model(**overrides)
    if memory == "filled":
        fill_memory(model, steps=model.config.memory_window)
        assert all(layer.memory_active for layer in model.memory_layers())
    return model.eval()


def _padded_batch(config, batch: int = 3, length: int = 6):
    pixel_values, ids = random_batch(config, batch=batch, length=length)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    mask[2, -1] = 0  # right padding
    return pixel_values, ids, mask


# ------------------------------------------------------------------------------------------------------------------
# 1. Encoder outputs in forward and generate
@MEMORY
def test_forward_returns_encoder_and_decoder_attentions_and_hidden_states(memory):
    model = _model(memory)
    model.set_attn_implementation("eager")
    config = model.config
    pixel_values, ids = random_batch(config, batch=2, length=5)
    out = model(pixel_values=pixel_values, input_ids=ids, output_attentions=True, output_hidden_states=True)
    n, heads, m = config.num_patches, config.num_attention_heads, config.num_prototypes if memory == "filled" else 0
    assert len(out.encoder_hidden_states) == config.num_interaction_layers + 1
    assert all(state.shape == (2, n, config.hidden_size) for state in out.encoder_hidden_states)
    assert len(out.encoder_attentions) == config.num_interaction_layers
    for weights in out.encoder_attentions:
        assert weights.shape == (2, heads, n, n)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, heads, n))
    # decoder self-attention: the 5 sequence columns, then the m prototypes; each row sums to one over both
    assert [w.shape for w in out.decoder_attentions] == [(2, heads, 5, 5 + m)] * config.num_hidden_layers
    torch.testing.assert_close(out.decoder_attentions[0].sum(-1), torch.ones(2, heads, 5))
    assert len(out.decoder_hidden_states) == config.num_hidden_layers + 1
    # the flags default to the config's
    model.config.output_attentions = True
    assert len(model(pixel_values=pixel_values, input_ids=ids).encoder_attentions) == config.num_interaction_layers


def test_without_fsgr_the_encoder_has_one_hidden_state_and_no_attentions():
    model = _model("empty", use_fsgr=False)
    model.set_attn_implementation("eager")
    pixel_values, ids = random_batch(model.config)
    out = model(pixel_values=pixel_values, input_ids=ids, output_attentions=True, output_hidden_states=True)
    assert len(out.encoder_hidden_states) == 1 and out.encoder_attentions == ()


@MEMORY
def test_generate_returns_encoder_attentions_and_hidden_states(memory):
    model = _model(memory)
    model.set_attn_implementation("eager")
    config = model.config
    pixel_values, _ = random_batch(config, batch=2)
    out = model.generate(
        pixel_values=pixel_values, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True,
        output_attentions=True, output_hidden_states=True,
    )
    n, m = config.num_patches, config.num_prototypes if memory == "filled" else 0
    assert [w.shape for w in out.encoder_attentions] == [(2, config.num_attention_heads, n, n)] * 2
    assert len(out.encoder_hidden_states) == config.num_interaction_layers + 1
    # step t attends to the t + 1 tokens so far, then the m prototypes
    assert [step[0].shape[-1] for step in out.decoder_attentions] == [1 + m, 2 + m, 3 + m]


# ------------------------------------------------------------------------------------------------------------------
# 2. return_dict
def test_return_dict_false_returns_the_outputs_tuple():
    model = _model("filled")
    pixel_values, ids = random_batch(model.config)
    as_dict = model(pixel_values=pixel_values, input_ids=ids, labels=ids)
    as_tuple = model(pixel_values=pixel_values, input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    model.config.return_dict = False
    assert isinstance(model(pixel_values=pixel_values, input_ids=ids), tuple)
    assert model(pixel_values=pixel_values, input_ids=ids, return_dict=True).logits.shape[-1] == model.config.vocab_size


# ------------------------------------------------------------------------------------------------------------------
# attn_implementation
@pytest.mark.parametrize("memory, num_prototypes", [("empty", 6), ("filled", 6), ("filled", 80)],
                         ids=["empty", "filled", "filled-batch-shared-matmul"])
def test_eager_and_sdpa_agree_and_only_eager_returns_weights(memory, num_prototypes):
    model = _model(memory, num_prototypes=num_prototypes, memory_window=8, memory_prior=True)
    pixel_values, ids, mask = _padded_batch(model.config)
    inputs = dict(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert model.config._attn_implementation == "sdpa"  # the default, fast path
    sdpa = model(**inputs, output_attentions=True)
    assert sdpa.decoder_attentions == (None, None) and sdpa.encoder_attentions == (None, None)
    model.set_attn_implementation("eager")
    eager = model(**inputs, output_attentions=True)
    assert all(isinstance(weights, torch.Tensor) for weights in eager.decoder_attentions + eager.cross_attentions)
    torch.testing.assert_close(eager.logits, sdpa.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager.encoder_last_hidden_state, sdpa.encoder_last_hidden_state, atol=1e-5, rtol=1e-5)


def test_attn_implementation_is_chosen_at_load_and_unsupported_ones_are_refused(tmp_path):
    model = _model("filled")
    model.save_pretrained(tmp_path)
    eager = FsgrPmaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    pixel_values, ids = random_batch(model.config)
    assert eager(pixel_values=pixel_values, input_ids=ids, output_attentions=True).decoder_attentions[0] is not None
    with pytest.raises(ValueError, match="does not support Flash Attention 2"):
        FsgrPmaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


# ------------------------------------------------------------------------------------------------------------------
# 3. get_encoder(modality) and torch.export
def test_get_encoder_by_modality():
    model = _model("empty")
    assert model.get_encoder() is model.encoder and model.get_encoder(modality="image") is model.encoder
    assert model.get_encoder(modality="audio") is model  # transformers' "none" answer
    with pytest.raises(ValueError):
        model.get_encoder(modality="smell")


@MEMORY
def test_torch_export_of_the_forward_pass(memory):
    """The unmerged LoRA tower included: exporting it must neither fail nor leave fake tensors in the model."""
    model = _model(memory)
    randomise_lora(model)  # a trained adapter, not LoRA's zero start
    pixel_values, ids, mask = _padded_batch(model.config)
    inputs = dict(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, use_cache=False)
    with torch.no_grad():
        expected = model(**inputs).logits
    program = torch.export.export(model, (), inputs)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**inputs).logits, expected)
        torch.testing.assert_close(model(**inputs).logits, expected)  # the model is intact


# ------------------------------------------------------------------------------------------------------------------
# torch.compile
def _compiled_forward_and_greedy_captions(backend: str) -> None:
    model = _model("filled")
    pixel_values, ids = random_batch(model.config)
    with torch.no_grad():
        expected_logits = model(pixel_values=pixel_values, input_ids=ids).logits
        expected_captions = model.generate(pixel_values=pixel_values, max_new_tokens=4, do_sample=False)
        compiled = torch.compile(model, backend=backend)
        torch.testing.assert_close(compiled(pixel_values=pixel_values, input_ids=ids).logits, expected_logits)
        model.forward = torch.compile(model.forward, backend=backend)  # what generate calls at every step
        captions = model.generate(pixel_values=pixel_values, max_new_tokens=4, do_sample=False)
    assert torch.equal(captions, expected_captions)


def test_torch_compile_traces_forward_and_greedy_generate():
    """Dynamo's capture (guards, graph breaks, recompiles) with the eager backend: seconds."""
    _compiled_forward_and_greedy_captions("eager")


def test_a_compiled_forward_sees_a_refresh_of_the_memory():
    model = _model("empty")
    pixel_values, ids = random_batch(model.config)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        before = compiled(pixel_values=pixel_values, input_ids=ids).logits
    fill_memory(model)  # trains (filling the banks) and refreshes: the compiled graph is guarded on the memory state
    with torch.no_grad():
        after = compiled(pixel_values=pixel_values, input_ids=ids).logits
        torch.testing.assert_close(after, model(pixel_values=pixel_values, input_ids=ids).logits)
    assert not torch.allclose(before, after)


@pytest.mark.slow
def test_torch_compile_with_inductor_forward_and_greedy_generate():
    """The default backend, compiled to C++: several minutes on two CPU cores."""
    _compiled_forward_and_greedy_captions("inductor")


# ------------------------------------------------------------------------------------------------------------------
# 4. Meta-device init: init_weights gives every buffer its initial value and every parameter a real init
def _seeded_init(monkeypatch) -> None:
    """Reseed before each module's init (as transformers' tests do), so two inits draw the same numbers."""
    original = PreTrainedModel._initialize_weights

    def seeded(self, module, *args, **kwargs):
        torch.manual_seed(42)
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", seeded)


@pytest.mark.parametrize(
    "overrides", [{}, {"num_prompt_tokens": 2, "memory_prior": True}], ids=["default", "prompts-prior"]
)
def test_meta_device_init_weights_equals_construction(monkeypatch, overrides):
    _seeded_init(monkeypatch)
    config = tiny_model(**overrides).config
    constructed = FsgrPmaForConditionalGeneration(config)
    with torch.device("meta"):
        model = FsgrPmaForConditionalGeneration(config)
    model.to_empty(device="cpu")
    model.init_weights()
    expected = constructed.state_dict()
    state = model.state_dict()
    assert state.keys() == expected.keys()
    different = [name for name, tensor in state.items() if not torch.equal(tensor, expected[name])]
    assert not different, different
    assert not any(layer.memory_active for layer in model.memory_layers())
    lora_b = [tensor for name, tensor in state.items() if "lora_B" in name]
    assert lora_b and all(not tensor.any() for tensor in lora_b)  # LoRA starts as the identity
    assert all(tensor.float().abs().max() < 10 for tensor in state.values())  # no uninitialised memory


# ------------------------------------------------------------------------------------------------------------------
# 5. Incomplete checkpoints: transformers' contract, missing tensors initialised by `_init_weights` and named in its
# warning; nothing left uninitialised, no memory attending to zero prototypes
def _load_without(tmp_path, model, dropped: str, monkeypatch):
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    kept = {name: tensor for name, tensor in weights.items() if dropped not in name}
    assert len(kept) < len(weights)
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _seeded_init(monkeypatch)
    loggers = [transformers_logging.get_logger("transformers.modeling_utils"),
               transformers_logging.get_logger("modeling_fsgr_pma.modeling_fsgr_pma")]
    with CaptureLogger(loggers[0]) as report, CaptureLogger(loggers[1]) as ours:
        loaded, info = FsgrPmaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    return weights, set(weights) - set(kept), loaded, info, report.out + ours.out


@pytest.mark.parametrize(
    "dropped", ["encoder.tower.visual.", "lora_A", "lora_B", "decoder.layers.1.", "prototype_", "codebook"]
)
def test_a_checkpoint_without_some_tensors_loads_them_initialised_and_names_them(tmp_path, monkeypatch, dropped):
    model = _model("filled", memory_prior=True)
    randomise_lora(model)  # a trained adapter, not LoRA's zero start
    weights, missing, loaded, info, warning = _load_without(tmp_path, model, dropped, monkeypatch)
    assert set(info["missing_keys"]) == missing
    assert all(name in warning for name in update_key_name(missing))  # transformers' report names each one
    state = loaded.state_dict()
    assert all(torch.isfinite(tensor.float()).all() and tensor.float().abs().max() < 10 for tensor in state.values())
    for name, tensor in weights.items():
        if name not in missing:
            assert torch.equal(state[name], tensor), name  # loaded tensors keep their values
    constructed = tiny_model(memory_prior=True).state_dict()  # the same seeded init, per module
    if dropped in ("encoder.tower.visual.", "decoder.layers.1."):  # whole modules: exactly a fresh model's init
        assert all(torch.equal(state[name], constructed[name]) for name in missing if "lora_" not in name)
    lora_b = [state[name] for name in missing if "lora_B" in name]
    assert all(not tensor.any() for tensor in lora_b)  # LoRA's init: B zero, the adapters start at the identity
    lora_a = [state[name] for name in missing if "lora_A" in name]
    assert all(tensor.std() > 0 and not torch.equal(tensor, weights[name])
               for name, tensor in zip([n for n in missing if "lora_A" in n], lora_a))
    # no memory attending to zero prototypes: a layer whose prototypes are missing is off until the first refresh
    lost = [any(f"layers.{layer.layer_idx}.self_attn.prototype_keys" in name for name in missing)
            for layer in loaded.memory_layers()]
    assert [not layer.memory_active for layer in loaded.memory_layers()] == lost
    assert ("memory stays off until the first refresh" in warning) == any(lost)
    pixel_values, ids = random_batch(loaded.config)
    with torch.no_grad():
        assert torch.isfinite(loaded.eval()(pixel_values=pixel_values, input_ids=ids).logits).all()
    if dropped == "codebook":
        assert "concept path" in warning and "set_codebook" in warning
        torch.testing.assert_close(loaded.encoder.codebook.embeddings, constructed["model.encoder.codebook.embeddings"])


def test_from_an_empty_state_dict_every_tensor_is_a_fresh_models(monkeypatch):
    """transformers' `test_can_init_all_missing_weights`: everything missing, everything initialised as at construction."""
    _seeded_init(monkeypatch)
    config = tiny_model(num_prompt_tokens=2, memory_prior=True).config
    constructed = FsgrPmaForConditionalGeneration(config).state_dict()
    model = FsgrPmaForConditionalGeneration.from_pretrained(None, config=config, state_dict={})
    loaded = model.state_dict()
    assert loaded.keys() == constructed.keys()
    assert not [name for name, tensor in loaded.items() if not torch.equal(tensor, constructed[name])]
    assert not any(layer.memory_active for layer in model.memory_layers())


def test_mismatched_vocabulary_is_reinitialised_properly(tmp_path):
    model = _model("filled")
    model.save_pretrained(tmp_path)
    larger, info = FsgrPmaForConditionalGeneration.from_pretrained(
        tmp_path, vocab_size=50, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert any("embed_tokens" in str(key) for key in info["mismatched_keys"])
    embeddings = larger.get_input_embeddings().weight
    assert embeddings.shape[0] == 50 and torch.isfinite(embeddings).all() and embeddings.std() < 1
    loaded = larger.state_dict()
    for name, tensor in model.state_dict().items():  # everything else is what was saved
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(loaded[name], tensor), name


# ------------------------------------------------------------------------------------------------------------------
# 6. An empty memory's parameters are in the graph (DDP with find_unused_parameters=False)
def test_an_empty_memorys_parameters_get_exact_zero_gradients_and_change_nothing():
    model = tiny_model(memory_prior=True).train()
    pixel_values, ids = random_batch(model.config)
    torch.manual_seed(0)
    loss = model(pixel_values=pixel_values, input_ids=ids, labels=ids).loss
    loss.backward()
    idle = [param for layer in model.memory_layers()
            for param in (layer.segment_sequence, layer.segment_memory, layer.prototype_log_prior)]
    assert all(param.grad is not None and not param.grad.any() for param in idle)
    torch.manual_seed(0)
    with torch.no_grad():  # no graph, no zero-weight connection: the same loss
        torch.testing.assert_close(model(pixel_values=pixel_values, input_ids=ids, labels=ids).loss, loss)
    fill_memory(model)
    assert all(layer.idle_parameters() == [] for layer in model.memory_layers())


# ------------------------------------------------------------------------------------------------------------------
# 7. The base model
def test_the_captioner_is_a_base_model_plus_the_lm_head():
    model = _model("filled")
    assert isinstance(model.base_model, FsgrPmaModel) and model.base_model is model.model
    assert model.encoder is model.model.encoder and model.decoder is model.model.decoder
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight  # tied
    assert not [name for name, _ in model.named_parameters() if not name.startswith(("model.", "lm_head."))]
    pixel_values, ids = random_batch(model.config)
    with torch.no_grad():
        hidden = model.model(pixel_values=pixel_values, input_ids=ids).last_hidden_state
        torch.testing.assert_close(model.lm_head(hidden), model(pixel_values=pixel_values, input_ids=ids).logits)


def test_a_base_model_checkpoint_loads_into_the_captioner(tmp_path):
    model = _model("filled")
    model.base_model.save_pretrained(tmp_path)
    loaded, info = FsgrPmaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the head's only weight is tied
    pixel_values, ids = random_batch(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(pixel_values=pixel_values, input_ids=ids).logits,
                                   model(pixel_values=pixel_values, input_ids=ids).logits)
