"""The decoding cache: prototypes never enter it; the rows of an image share one copy of its cross-attention keys."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from conftest import fill_memory, random_batch, tiny_model


def _model(num_prototypes: int = 6, memory_prior: bool = False, use_memory: bool = True):
    model = tiny_model(num_prototypes=num_prototypes, memory_window=8, memory_prior=memory_prior, use_memory=use_memory)
    if use_memory:
        fill_memory(model, steps=12)
        assert all(layer.memory_active for layer in model.memory_layers())
    if memory_prior:
        with torch.no_grad():
            for layer in model.memory_layers():
                layer.prototype_log_prior.normal_()
    return model.eval()


def _plain_cache() -> EncoderDecoderCache:
    """transformers' own cache, one cross-attention row per sequence."""
    return EncoderDecoderCache(DynamicCache(), DynamicCache())


@pytest.mark.parametrize("num_beams", [1, 5], ids=["greedy", "beam5"])
@pytest.mark.parametrize(
    "num_prototypes, memory_prior, use_memory",
    [(6, False, True), (6, True, True), (80, False, True), (6, False, False)],
    ids=["memory", "memory-log-prior", "more-prototypes", "no-memory"],
)
def test_generate_with_our_cache_equals_the_plain_cache(num_beams, num_prototypes, memory_prior, use_memory):
    model = _model(num_prototypes, memory_prior, use_memory)
    pixel_values, _ = random_batch(model.config, batch=3)
    settings = dict(pixel_values=pixel_values, max_new_tokens=12, num_beams=num_beams, do_sample=False,
                    return_dict_in_generate=True, output_scores=True)
    ours = model.generate(**settings)  # FsgrPmaCache
    plain = model.generate(**settings, past_key_values=_plain_cache())
    assert torch.equal(ours.sequences, plain.sequences)
    for got, want in zip(ours.scores, plain.scores):
        torch.testing.assert_close(got, want)


def test_cached_attention_weights_put_the_prototype_columns_last():
    model = _model()
    model.set_attn_implementation("eager")
    pixel_values, ids = random_batch(model.config, batch=2, length=5)
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(pixel_values=pixel_values)
        ours, plain = model.new_cache(), _plain_cache()
        for t in range(ids.shape[1]):
            step = dict(encoder_outputs=encoder_outputs, input_ids=ids[:, t : t + 1], output_attentions=True)
            got = model(**step, past_key_values=ours).decoder_attentions
            want = model(**step, past_key_values=plain).decoder_attentions
            for layer_got, layer_want in zip(got, want):
                assert layer_got.shape == (2, model.config.num_attention_heads, 1, t + 1 + 6)  # (B, h, T, S + m)
                torch.testing.assert_close(layer_got, layer_want)


def test_generation_follows_every_change_of_the_log_prior_and_the_ramp():
    """A changed log-prior, ramp or dtype is seen at once by generation, as by the plain cache."""
    model = _model(memory_prior=True)
    layer = model.memory_layers()[0]
    pixel_values, _ = random_batch(model.config, batch=2)
    settings = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True)

    def scores(cache=None):
        with torch.inference_mode():
            inputs = pixel_values.to(model.dtype)
            return torch.stack(model.generate(pixel_values=inputs, past_key_values=cache, **settings).scores)

    def add_to_the_prior():
        with torch.no_grad():
            layer.prototype_log_prior.add_(2.0)

    def load_another_prior():
        layer.load_state_dict({**layer.state_dict(), "prototype_log_prior": torch.randn_like(layer.prototype_log_prior)})

    changes = {
        "in-place write": add_to_the_prior,
        "load_state_dict": load_another_prior,
        "ramp": lambda: model.set_memory_ramp(0.25),
    }
    torch.testing.assert_close(scores(), scores(_plain_cache()))
    for name, change in changes.items():
        before = scores()
        change()
        after = scores()
        assert not torch.allclose(before, after), name
        torch.testing.assert_close(after, scores(_plain_cache()), msg=name)
    model.double()  # the reused prototype heads follow the dtype
    torch.testing.assert_close(scores(), scores(_plain_cache()))


@pytest.mark.parametrize(
    "settings, rows, returned",
    [({"num_beams": 4}, 4, 1), ({"do_sample": True, "num_return_sequences": 2}, 2, 2)],
    ids=["beams", "returned-sequences"],
)
def test_the_rows_of_an_image_share_one_copy_of_its_cross_attention_keys(settings, rows, returned):
    model = _model()
    pixel_values, _ = random_batch(model.config, batch=3)
    seen = []  # (rows of queries, rows of cached cross-attention keys) at every decoding step

    def record(module, args, output):
        hidden_states, cache = args[0], args[3]
        seen.append((hidden_states.shape[0], cache.cross_attention_cache.layers[module.layer_idx].keys.shape[0]))

    hook = model.decoder.layers[1].cross_attn.register_forward_hook(record)
    torch.manual_seed(0)
    out = model.generate(pixel_values=pixel_values, max_new_tokens=6, return_dict_in_generate=True, **settings)
    hook.remove()
    assert out.sequences.shape[0] == 3 * returned and len(seen) == 6
    assert set(seen) == {(3 * rows, 3)}  # one copy of the keys per image, for its `rows` rows
    cache = out.past_key_values  # returned in transformers' layout: one row per sequence
    assert cache.rows_per_image == 1
    for layer in cache.cross_attention_cache.layers:
        assert layer.keys.shape[0] == 3 * rows and layer.values.shape[0] == 3 * rows


def test_shared_cross_attention_weights_are_each_rows_own():
    model = _model()
    model.set_attn_implementation("eager")
    pixel_values, _ = random_batch(model.config, batch=2)
    settings = dict(pixel_values=pixel_values, max_new_tokens=5, num_beams=3, do_sample=False,
                    return_dict_in_generate=True, output_attentions=True)
    ours = model.generate(**settings)
    plain = model.generate(**settings, past_key_values=_plain_cache())
    assert torch.equal(ours.sequences, plain.sequences)
    for step_got, step_want in zip(ours.cross_attentions, plain.cross_attentions):
        for got, want in zip(step_got, step_want):
            assert got.shape == (6, model.config.num_attention_heads, 1, model.config.num_patches)  # (B, h, T, S)
            torch.testing.assert_close(got, want)


def test_batch_selection_of_a_shared_cache_restores_one_row_per_sequence():
    model = _model()
    pixel_values, ids = random_batch(model.config, batch=2, length=4)
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(pixel_values=pixel_values)
        encoder_outputs.last_hidden_state = encoder_outputs.last_hidden_state.repeat_interleave(2, dim=0)
        ids = ids.repeat_interleave(2, dim=0)  # (4, T): two rows per image, as generate makes them
        shared, plain = model.new_cache(), _plain_cache()
        shared.rows_per_image = 2
        for cache in (shared, plain):
            model(encoder_outputs=encoder_outputs, input_ids=ids[:, :3], past_key_values=cache)
        assert shared.cross_attention_cache.layers[0].keys.shape[0] == 2
        keep = torch.tensor([3, 0])
        for cache in (shared, plain):
            cache.batch_select_indices(keep)
        assert shared.rows_per_image == 1 and shared.cross_attention_cache.layers[0].keys.shape[0] == 2
        selected = encoder_outputs.last_hidden_state[keep]
        step = dict(encoder_outputs=type(encoder_outputs)(last_hidden_state=selected), input_ids=ids[keep, 3:])
        torch.testing.assert_close(model(**step, past_key_values=shared).logits,
                                   model(**step, past_key_values=plain).logits)
