"""Model tests on a tiny config: shapes, loss, gradients, causality, generation invariants, dtype, bad input."""

from __future__ import annotations

import pytest
import torch

from conftest import BOS, EOS, PAD, fill_memory, random_batch, randomise_lora, tiny_config, tiny_model
from modeling_fsgr_pma import FsgrPmaForConditionalGeneration


# ------------------------------------------------------------------------------------------------------------------
# Shapes, loss, gradients
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_memory": False},
        {"use_fsgr": False},
        {"num_prompt_tokens": 3},
        {"lora_rank": 0, "supcon_weight": 0.0},
    ],
    ids=["default", "no-memory", "no-fsgr", "deep-prompts", "no-lora-no-supcon"],
)
def test_forward_shapes_and_scalar_loss(overrides):
    model = tiny_model(**overrides).train()
    config = model.config
    pixel_values, ids = random_batch(config, batch=3, length=6)
    out = model(pixel_values=pixel_values, input_ids=ids, labels=ids)
    assert out.logits.shape == (3, 6, config.vocab_size)
    assert out.encoder_last_hidden_state.shape == (3, config.num_patches, config.hidden_size)
    assert out.patch_concepts.shape == (3, config.num_patches)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    if config.supcon_weight > 0:
        torch.testing.assert_close(out.loss, out.xe_loss + config.supcon_weight * out.supcon_loss)


@pytest.mark.parametrize("overrides", [{}, {"num_prompt_tokens": 2}], ids=["default", "deep-prompts"])
def test_every_trainable_parameter_gets_a_gradient(overrides):
    model = tiny_model(**overrides)
    fill_memory(model)
    # LoRA B starts at zero, which makes A's gradient exactly zero; any step away from init gives both a gradient.
    randomise_lora(model, std=0.02)
    model.train()
    pixel_values, ids = random_batch(model.config)
    model(pixel_values=pixel_values, input_ids=ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient reaches {missing}"
    nan = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not nan


def test_tower_is_frozen_except_lora_and_prompts():
    model = tiny_model(num_prompt_tokens=2)
    trainable = [n for n, p in model.encoder.tower.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("prompt") for n in trainable)
    first = model.config.lora_first_block
    assert not any(f"resblocks.{i}." in n for n in trainable for i in range(first))


def test_deep_prompts_enter_every_block_as_in_fsgr():
    """FSGR's `forward_deep_prompt`: a new prompt set before every block, so only the patch embedding is frozen, and
    VPT's init (prompts uniform in ±sqrt(6 / (3 p² + d_v)), a Kaiming-normal projection)."""
    model = tiny_model(num_prompt_tokens=2, dropout=0.0).train()
    config, tower = model.config, model.encoder.tower
    assert config.frozen_blocks == 0 < config.lora_first_block and tower.prompts.shape[0] == config.vision_layers
    bound = (6 / (3 * config.patch_size**2 + config.vision_width)) ** 0.5
    assert tower.prompts.abs().max() <= bound and tower.prompts.std() > bound / 3
    assert tower.prompt_proj.weight.std() > 3 * config.initializer_range  # fan-out Kaiming, not the default init
    pixel_values, ids = random_batch(config)
    torch.testing.assert_close(tower.frozen_prefix(pixel_values), tower.embed(pixel_values))
    model(pixel_values=pixel_values, input_ids=ids, labels=ids).loss.backward()
    assert all(tower.prompts.grad[block].abs().sum() > 0 for block in range(config.vision_layers))


@pytest.mark.parametrize("merged", [False, True], ids=["lora", "merged"])
def test_deep_prompts_as_keys_only_equal_fsgrs_full_sequence(merged):
    """`prompted_block` gives the class and patch tokens the outputs FSGR's `forward_deep_prompt` gives them: every
    block run over `[cls; prompts; patches]`, the prompts dropped after each."""
    model = tiny_model(num_prompt_tokens=3, dropout=0.0).eval()
    randomise_lora(model)
    if merged:
        model.merge_encoder_lora()
    tower = model.encoder.tower
    pixel_values, _ = random_batch(model.config)
    x = tower.frozen_prefix(pixel_values)  # (B, 1 + n, d_v)
    for i, block in enumerate(tower.blocks):
        prompt = tower.prompt_proj(tower.prompts[i]).expand(x.shape[0], -1, -1)  # (B, P, d_v)
        out = block(torch.cat([x[:, :1], prompt, x[:, 1:]], dim=1))  # (B, 1 + P + n, d_v)
        x = torch.cat([out[:, :1], out[:, 1 + prompt.shape[1] :]], dim=1)
    tokens, _ = tower.adapted_blocks(tower.frozen_prefix(pixel_values))
    torch.testing.assert_close(tokens, tower.prompt_norm(x))


def test_prompt_keys_values_are_reused_in_inference_until_a_weight_changes():
    """Inference reuses the deep prompts' keys and values; changing any weight they are made from (in place, or by
    loading a state dict) makes them anew, so the encoder never runs on stale ones. Training never reuses them."""
    model = tiny_model(num_prompt_tokens=3, dropout=0.0).eval()
    randomise_lora(model)
    tower = model.encoder.tower
    pixel_values, _ = random_batch(model.config)
    with torch.no_grad():
        assert tower.prompt_keys_values(torch.float32) is not tower.prompt_keys_values(torch.float32)  # LoRA wrapped
        model.merge_encoder_lora()
        first = tower.prompt_keys_values(torch.float32)
        assert tower.prompt_keys_values(torch.float32) is first
        state = {name: tensor.clone() for name, tensor in tower.state_dict().items()}
        for weight in (tower.prompts, tower.prompt_proj.bias, tower.blocks[-1].ln_1.weight,
                       tower.blocks[0].attn.in_proj_weight):
            tower.prompt_keys_values(torch.float32)  # held for reuse
            weight.add_(0.5)
            reused = tower.adapted_blocks(tower.frozen_prefix(pixel_values))[0]
            with torch.enable_grad():
                fresh = tower.adapted_blocks(tower.frozen_prefix(pixel_values))[0]
            torch.testing.assert_close(reused, fresh)
        changed = tower.prompt_keys_values(torch.float32)
        tower.load_state_dict(state)
        torch.testing.assert_close(tower.prompt_keys_values(torch.float32), first)
        assert tower.prompt_keys_values(torch.float32) is not changed
        model.train()
        assert tower.prompt_keys_values(torch.float32) is not tower.prompt_keys_values(torch.float32)


def test_no_gradient_reaches_codebook_or_prototypes(model_with_memory):
    buffers = dict(model_with_memory.named_buffers())
    for name in ("model.encoder.codebook.embeddings", "model.decoder.layers.0.self_attn.prototype_keys"):
        assert not buffers[name].requires_grad
        assert name not in dict(model_with_memory.named_parameters())


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    losses, grads = [], []
    for checkpointing in (False, True):
        model = tiny_model()
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        pixel_values, ids = random_batch(model.config)
        torch.manual_seed(1)  # same Gumbel noise
        loss = model(pixel_values=pixel_values, input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        lora = [p for n, p in model.encoder.tower.named_parameters() if "lora_B" in n]  # the checkpointed blocks
        grads.append([model.decoder.layers[0].self_attn.qkv_proj.weight.grad.clone(), *(p.grad for p in lora)])
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_labels_ignore_padding_and_minus_100(model):
    pixel_values, ids = random_batch(model.config, batch=1, length=6)
    padded = torch.cat([ids, torch.full((1, 3), PAD)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], dim=1).long()
    plain = model(pixel_values=pixel_values, input_ids=ids, labels=ids).loss
    with_pad = model(pixel_values=pixel_values, input_ids=padded, attention_mask=mask, labels=padded).loss
    ignored = padded.masked_fill(mask == 0, -100)
    with_ignore = model(pixel_values=pixel_values, input_ids=padded, attention_mask=mask, labels=ignored).loss
    torch.testing.assert_close(plain, with_pad)
    torch.testing.assert_close(plain, with_ignore)


def test_no_attention_mask_equals_a_mask_of_ones_in_training_and_in_cached_steps():
    """Without a mask the positions are rows of the table and a decoding step has no mask: same as all ones."""
    pixel_values, ids = random_batch(tiny_config(), batch=2, length=6)
    runs = []
    for mask in (None, torch.ones_like(ids)):
        model = tiny_model(dropout=0.0)
        fill_memory(model)
        model.train()
        torch.manual_seed(0)  # the bank's row sample
        loss = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
        banks = [layer.bank_contents() for layer in model.memory_layers()]
        model.eval()
        with torch.no_grad():
            cache, step_logits = model.new_cache(), []
            for t in range(ids.shape[1]):  # one token at a time, the way generate decodes
                step_mask = None if mask is None else mask[:, : t + 1]
                out = model(pixel_values=pixel_values, input_ids=ids[:, t : t + 1], attention_mask=step_mask,
                            past_key_values=cache, use_cache=True)
                step_logits.append(out.logits)
        runs.append((loss, grads, banks, torch.cat(step_logits, dim=1)))
    (loss_a, grads_a, banks_a, steps_a), (loss_b, grads_b, banks_b, steps_b) = runs
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and "model.decoder.embed_positions.weight" in grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)
    for (keys_a, values_a), (keys_b, values_b) in zip(banks_a, banks_b):
        torch.testing.assert_close(keys_a, keys_b)
        torch.testing.assert_close(values_a, values_b)
    torch.testing.assert_close(steps_a, steps_b)


# ------------------------------------------------------------------------------------------------------------------
# Causality and memory semantics
@pytest.mark.parametrize("with_memory", [False, True], ids=["empty-memory", "prototypes"])
def test_changing_token_t_never_changes_earlier_logits(with_memory):
    model = tiny_model()
    if with_memory:
        fill_memory(model)
        assert all(layer.memory_active for layer in model.memory_layers())
    model.eval()
    pixel_values, ids = random_batch(model.config, batch=1, length=8)
    reference = model(pixel_values=pixel_values, input_ids=ids).logits
    for t in range(1, 8):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1 - 3) % (model.config.vocab_size - 3) + 3
        logits = model(pixel_values=pixel_values, input_ids=changed).logits
        torch.testing.assert_close(logits[:, :t], reference[:, :t])
        assert not torch.allclose(logits[:, t:], reference[:, t:])


def test_prototypes_change_the_output(model_with_memory):
    pixel_values, ids = random_batch(model_with_memory.config)
    with_memory = model_with_memory(pixel_values=pixel_values, input_ids=ids).logits
    for layer in model_with_memory.memory_layers():
        layer.prototype_ready.fill_(False)
    without = model_with_memory(pixel_values=pixel_values, input_ids=ids).logits
    assert not torch.allclose(with_memory, without)


def test_prototype_heads_follow_every_change(model_with_memory):
    """Captioning (inference mode) and training read the same prototypes: every change is seen at once."""
    model = model_with_memory
    pixel_values, ids = random_batch(model.config)
    layer = model.memory_layers()[0]

    def captioning_logits():
        with torch.inference_mode():
            return model(pixel_values=pixel_values, input_ids=ids).logits.clone()

    def fresh_logits():
        return model(pixel_values=pixel_values, input_ids=ids).logits.detach()

    def train_segment_embeddings():
        model.train()
        segments = [layer.segment_memory for layer in model.memory_layers()]
        segments += [layer.segment_sequence for layer in model.memory_layers()]
        optimizer = torch.optim.SGD(segments, lr=1.0)
        model(pixel_values=pixel_values, input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.eval()

    def load_other_values():
        state = {**layer.state_dict(), "prototype_values": torch.randn_like(layer.prototype_values)}
        layer.load_state_dict(state)

    changes = {
        "in-place write": lambda: layer.prototype_keys.add_(1.0),
        "refresh": lambda: model.refresh_memory(seed=3, backend="torch"),
        "load_state_dict": load_other_values,
        "optimiser step on the segment embeddings": train_segment_embeddings,
        "prototypes switched off": lambda: layer.prototype_ready.fill_(False),
    }
    torch.testing.assert_close(captioning_logits(), fresh_logits())
    for name, change in changes.items():
        before = captioning_logits()
        change()
        after = captioning_logits()
        assert not torch.allclose(before, after), name
        torch.testing.assert_close(after, fresh_logits(), msg=name)
    model.double()
    pixel_values = pixel_values.double()
    assert captioning_logits().dtype == torch.float64
    torch.testing.assert_close(captioning_logits(), fresh_logits())


def test_memory_off_equals_a_plain_decoder():
    """With use_memory=False the self-attention is exactly softmax(QK^T/sqrt(d) + causal) V."""
    model = tiny_model(use_memory=False).eval()
    attention = model.decoder.layers[0].self_attn
    assert not hasattr(attention, "prototype_keys") and not hasattr(attention, "segment_sequence")
    x = torch.randn(2, 5, model.config.hidden_size)
    mask = model.decoder.causal_mask(torch.ones(2, 5, dtype=torch.bool), 5)
    out, _ = attention(x, mask)
    q, k, v = attention.qkv_proj(x).split(x.shape[-1], dim=-1)
    heads = lambda t: t.view(2, 5, 2, -1).transpose(1, 2)  # noqa: E731  (B, h, T, hd)
    scores = heads(q) @ heads(k).transpose(-1, -2) / heads(q).shape[-1] ** 0.5
    scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    manual = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(2, 5, -1)
    torch.testing.assert_close(out, attention.out_proj(manual))


def _memory_attention_with_random_prototypes(num_prototypes: int, **overrides):
    """The first decoder layer's memory attention, its prototypes, segment embeddings (and log-prior) random, ready."""
    model = tiny_model(num_prototypes=num_prototypes, memory_window=8, **overrides)
    attention = model.decoder.layers[0].self_attn
    with torch.no_grad():
        for tensor in (attention.prototype_keys, attention.prototype_values, attention.segment_memory,
                       attention.segment_sequence):
            tensor.normal_()
        if model.config.memory_prior:
            attention.prototype_log_prior.normal_()
        attention.prototype_ready.fill_(True)
    return model, attention


def _paper_memory_attention(attention, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PMA-Net written out: softmax over keys [K + s_seq ; M_K + s_mem], values [V ; M_V]; (output, weights).

    Our extension: the log-prior b_h (when configured) and log(memory_ramp) are added to the prototype scores.
    """
    batch, length, _ = x.shape
    heads = lambda t: t.view(*t.shape[:-1], 2, -1).transpose(-3, -2)  # noqa: E731  (..., h, L, hd)
    q, k, v = attention.qkv_proj(x).split(x.shape[-1], dim=-1)
    memory_keys = heads(attention.prototype_keys + attention.segment_memory).expand(batch, -1, -1, -1)  # (B, h, m, hd)
    keys = torch.cat([heads(k + attention.segment_sequence), memory_keys], dim=2)  # (B, h, S + m, hd)
    values = torch.cat([heads(v), heads(attention.prototype_values).expand(batch, -1, -1, -1)], dim=2)
    always = torch.ones(*mask.shape[:-1], attention.prototype_keys.shape[0], dtype=torch.bool)
    visible = torch.cat([mask, always], dim=-1)  # (B, 1, T, S + m)
    scores = heads(q) @ keys.transpose(-1, -2) / heads(q).shape[-1] ** 0.5  # (B, h, T, S + m)
    bias = torch.zeros(scores.shape[-1])
    bias[mask.shape[-1] :] = torch.log(torch.tensor(attention.memory_ramp))
    bias = bias + torch.zeros(2, 1, 1)  # (h, 1, S + m)
    if attention.config.memory_prior:
        bias[:, :, mask.shape[-1] :] += attention.prototype_log_prior[:, None, None]
    weights = (scores + bias).masked_fill(~visible, float("-inf")).softmax(-1)
    return attention.out_proj((weights @ values).transpose(1, 2).reshape(batch, length, -1)), weights


MEMORY_CONTROLS = pytest.mark.parametrize(
    "memory_prior, ramp", [(False, 1.0), (True, 1.0), (False, 0.25), (True, 0.25)],
    ids=["paper", "log-prior", "ramp", "log-prior-and-ramp"],
)


@MEMORY_CONTROLS
@pytest.mark.parametrize("num_prototypes", [6, 80], ids=["concatenated", "batch-shared-matmul"])
def test_memory_attention_is_one_softmax_over_sequence_and_prototypes(num_prototypes, memory_prior, ramp):
    """Keys [K + s_seq ; M_K + s_mem], values [V ; M_V], causal and padding masks on the sequence part only."""
    model, attention = _memory_attention_with_random_prototypes(num_prototypes, memory_prior=memory_prior)
    model.set_memory_ramp(ramp)
    model.eval()
    x = torch.randn(2, 5, model.config.hidden_size)
    padding = torch.ones(2, 5, dtype=torch.bool)
    padding[1, :2] = False  # left padding
    mask = model.decoder.causal_mask(padding, 5)  # (B, 1, T, S)
    out_fast, _ = attention(x, mask)  # SDPA, the default
    model.set_attn_implementation("eager")  # the implementation that returns the weights
    out, weights = attention(x, mask, output_attentions=True)
    model.set_attn_implementation("sdpa")
    expected, expected_weights = _paper_memory_attention(attention, x, mask)
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out_fast, expected)

    # The same attention one token at a time, with the cache (no mask, a growing sequence).
    pixel_values, ids = random_batch(model.config, batch=2, length=6)
    with torch.no_grad():
        full = model(pixel_values=pixel_values, input_ids=ids).logits
        cache, steps = model.new_cache(), []
        encoder_outputs = model.get_encoder()(pixel_values=pixel_values)
        for t in range(ids.shape[1]):
            step = model(encoder_outputs=encoder_outputs, input_ids=ids[:, t : t + 1], past_key_values=cache)
            steps.append(step.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


@MEMORY_CONTROLS
@pytest.mark.parametrize("num_prototypes", [6, 80], ids=["concatenated", "batch-shared-matmul"])
def test_segment_embeddings_get_the_gradients_of_keys_plus_segments(num_prototypes, memory_prior, ramp):
    """Training scores [K ; M_K + s_mem - s_seq]: s_seq and s_mem (and the log-prior) get the paper form's gradients."""
    model, attention = _memory_attention_with_random_prototypes(num_prototypes, dropout=0.0, memory_prior=memory_prior)
    model.set_memory_ramp(ramp)
    model.train()
    x = torch.randn(2, 5, model.config.hidden_size)
    mask = model.decoder.causal_mask(torch.ones(2, 5, dtype=torch.bool), 5)
    cotangent = torch.randn(2, 5, model.config.hidden_size)
    segments = (attention.segment_sequence, attention.segment_memory)
    if memory_prior:
        segments += (attention.prototype_log_prior,)

    out, _ = attention(x, mask)
    layer_grads = torch.autograd.grad((out * cotangent).sum(), segments)
    expected, _ = _paper_memory_attention(attention, x, mask)
    expected_grads = torch.autograd.grad((expected * cotangent).sum(), segments)

    torch.testing.assert_close(out, expected)
    for got, want in zip(layer_grads, expected_grads):
        assert want.abs().max() > 1e-4  # a real gradient, not two zeros
        torch.testing.assert_close(got, want)


def test_banks_fill_only_in_training_mode():
    model = tiny_model()
    pixel_values, ids = random_batch(model.config)
    model.eval()
    model(pixel_values=pixel_values, input_ids=ids)
    assert all(layer.bank_filled == 0 for layer in model.memory_layers())
    model.train()
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # padding never enters the bank
    model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask)
    assert all(layer.bank_filled == 7 + 4 for layer in model.memory_layers())


def test_bank_is_a_bounded_ring_buffer():
    model = tiny_model()
    model.train()
    capacity = model.config.memory_bank_size
    for step in range(10):
        pixel_values, ids = random_batch(model.config, batch=4, length=9, seed=step)
        model(pixel_values=pixel_values, input_ids=ids)
    layer = model.memory_layers()[0]
    assert layer.bank_filled == capacity and layer.bank_keys.shape[0] == capacity
    assert layer.bank_next == (10 * model.config.memory_tokens_per_step) % capacity


# ------------------------------------------------------------------------------------------------------------------
# Generation invariants
def _generate(model, pixel_values, **kwargs):
    kwargs = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": PAD, **kwargs}
    return model.generate(pixel_values=pixel_values, **kwargs)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_and_without_cache_agree(model_with_memory, num_beams):
    pixel_values, _ = random_batch(model_with_memory.config, batch=2)
    cached = _generate(model_with_memory, pixel_values, num_beams=num_beams, use_cache=True)
    uncached = _generate(model_with_memory, pixel_values, num_beams=num_beams, use_cache=False)
    assert torch.equal(cached, uncached)
    assert (cached[:, 0] == BOS).all()


def test_beam_search_skipping_the_cross_attention_reorder_is_exact(model_with_memory):
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    pixel_values, _ = random_batch(model_with_memory.config, batch=3, seed=5)
    ours = _generate(model_with_memory, pixel_values, num_beams=4, min_new_tokens=8)
    reordering_everything = _generate(
        model_with_memory, pixel_values, num_beams=4, min_new_tokens=8,
        past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()),
    )
    assert torch.equal(ours, reordering_everything)


def test_batch_of_four_equals_four_single_runs(model_with_memory):
    pixel_values, _ = random_batch(model_with_memory.config, batch=4, seed=3)
    batched = _generate(model_with_memory, pixel_values, min_new_tokens=10)
    for i in range(4):
        single = _generate(model_with_memory, pixel_values[i : i + 1], min_new_tokens=10)
        assert torch.equal(batched[i : i + 1], single)


def test_beam_search_and_return_sequences(model_with_memory):
    pixel_values, _ = random_batch(model_with_memory.config, batch=2)
    out = _generate(model_with_memory, pixel_values, num_beams=4, num_return_sequences=3)
    assert out.shape[0] == 6
    sampled = _generate(model_with_memory, pixel_values, do_sample=True, num_return_sequences=2, top_k=5)
    assert sampled.shape[0] == 4


def test_prototypes_never_enter_the_cache(model_with_memory):
    pixel_values, ids = random_batch(model_with_memory.config, batch=2, length=5)
    out = model_with_memory(pixel_values=pixel_values, input_ids=ids, use_cache=True)
    cache = out.past_key_values
    assert cache.get_seq_length() == 5
    assert cache.self_attention_cache.layers[0].keys.shape[2] == 5
    assert cache.cross_attention_cache.layers[0].keys.shape[2] == model_with_memory.config.num_patches


def test_generation_stops_at_eos():
    model = tiny_model().eval()
    with torch.no_grad():  # make EOS the overwhelming next token everywhere
        model.lm_head.weight.zero_()
        model.decoder.norm.weight.zero_()
        model.decoder.norm.bias.fill_(1.0)
        model.lm_head.weight[EOS] = 1.0
    pixel_values, _ = random_batch(model.config)
    out = _generate(model, pixel_values, eos_token_id=EOS, max_new_tokens=15)
    assert out.shape[1] == 2 and (out[:, 1] == EOS).all()


def test_cross_attention_and_concept_outputs_for_visualisation(model_with_memory):
    config = model_with_memory.config
    model_with_memory.set_attn_implementation("eager")  # the implementation that returns the weights
    pixel_values, _ = random_batch(config, batch=1)
    out = _generate(
        model_with_memory, pixel_values, output_attentions=True, return_dict_in_generate=True, max_new_tokens=4
    )
    step0 = out.cross_attentions[0]
    assert len(step0) == config.num_hidden_layers
    assert step0[0].shape[-1] == config.num_patches
    self_attention = out.decoder_attentions[0][0]
    assert self_attention.shape[-1] == 1 + config.num_prototypes  # BOS + prototypes
    encoded = model_with_memory.get_encoder()(pixel_values=pixel_values)
    assert encoded.patch_concepts.shape == (1, config.num_patches)
    assert encoded.patch_concepts.max() < config.num_concepts


# ------------------------------------------------------------------------------------------------------------------
# dtype
def test_bfloat16_forward_and_generate_from_float32_pixels(model_with_memory):
    model = model_with_memory.to(torch.bfloat16)
    pixel_values, ids = random_batch(model.config)
    logits = model(pixel_values=pixel_values.float(), input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    out = _generate(model, pixel_values.float(), num_beams=2)
    assert out.shape[0] == 2


# ------------------------------------------------------------------------------------------------------------------
# Bad input
@pytest.mark.parametrize(
    "shape, match",
    [((2, 1, 32, 32), r"pixel_values must have shape \(batch, 3, 32, 32\)"), ((2, 3, 48, 48), "processor")],
)
def test_wrong_pixel_values_shape_is_a_clear_error(model, shape, match):
    _, ids = random_batch(model.config)
    with pytest.raises(ValueError, match=match):
        model(pixel_values=torch.randn(shape), input_ids=ids)


def test_token_ids_outside_the_vocabulary_are_a_clear_error(model):
    pixel_values, ids = random_batch(model.config)
    ids[0, 2] = model.config.vocab_size + 5
    with pytest.raises(ValueError, match=r"token id 45, outside the vocabulary \[0, 40\)"):
        model(pixel_values=pixel_values, input_ids=ids)


def test_too_long_sequence_is_a_clear_error(model):
    pixel_values, _ = random_batch(model.config)
    ids = torch.full((2, model.config.max_position_embeddings + 1), 5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(pixel_values=pixel_values, input_ids=ids)


def test_refresh_with_fewer_entries_than_prototypes_is_a_clear_error():
    model = tiny_model()
    model.train()
    pixel_values, ids = random_batch(model.config, batch=1, length=3)
    model(pixel_values=pixel_values, input_ids=ids)
    with pytest.raises(ValueError, match="3 entries < 6 prototypes"):
        model.refresh_memory(seed=0)


def test_codebook_of_wrong_shape_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"codebook must have shape \(12, 32\)"):
        model.set_codebook(torch.randn(5, 32))


def test_vision_hidden_states_give_the_same_output_as_pixels(model):
    pixel_values, ids = random_batch(model.config)
    cached = model.encoder.tower.frozen_prefix(pixel_values)
    from_pixels = model(pixel_values=pixel_values, input_ids=ids).logits
    from_cache = model(vision_hidden_states=cached, input_ids=ids).logits
    torch.testing.assert_close(from_pixels, from_cache)
    with pytest.raises(ValueError, match="exactly one of"):
        model(pixel_values=pixel_values, vision_hidden_states=cached, input_ids=ids)


def test_model_class_is_exported():
    assert FsgrPmaForConditionalGeneration.main_input_name == "pixel_values"
    assert tiny_config().is_encoder_decoder
