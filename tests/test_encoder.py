"""FSGR encoder stages: quantisation (straight-through, argmax), SupCon, LoRA, dense embeddings (SCLIP, MaskCLIP)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import random_batch, randomise_lora, tiny_model
from modeling_fsgr_pma import FsgrPmaForConditionalGeneration
from modeling_fsgr_pma.modeling_fsgr_pma import supcon_loss


def _stage_inputs(model, batch=2):
    pixel_values, _ = random_batch(model.config, batch=batch)
    prefix = model.encoder.frozen_prefix(pixel_values, None)
    return model.encoder.encode_image(prefix)


def test_eval_assignment_is_the_argmax_over_selected_concepts():
    model = tiny_model().eval()
    _, _, global_embedding, dense = _stage_inputs(model)
    language, patch_concepts, selected, concepts = model.encoder.quantize(dense, global_embedding)
    codebook = model.encoder.codebook.embeddings
    similarity = torch.nn.functional.normalize(dense, dim=-1) @ codebook[selected].transpose(1, 2)  # (B, n, k)
    assert torch.equal(patch_concepts, selected.gather(1, similarity.argmax(-1)))
    expected_top = (torch.nn.functional.normalize(global_embedding, dim=-1) @ codebook.T).topk(4).indices
    assert torch.equal(selected, expected_top)
    # T = Â C with Â = A / (ΣA + 1): a patch's vector is its concept scaled by 1 / (count + 1).
    counts = (patch_concepts[:, :, None] == patch_concepts[:, None, :]).sum(-1, keepdim=True)  # (B, n, 1)
    torch.testing.assert_close(language, codebook[patch_concepts] / (counts + 1))


def test_training_assignment_is_one_hot_with_straight_through_gradient():
    model = tiny_model().train()
    _, _, global_embedding, dense = _stage_inputs(model)
    dense = dense.detach().requires_grad_(True)
    language, patch_concepts, _, _ = model.encoder.quantize(dense, global_embedding.detach())
    assert patch_concepts.shape == dense.shape[:2]
    language.sum().backward()
    assert dense.grad is not None and dense.grad.abs().sum() > 0


def test_supcon_loss_prefers_clustered_features():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    clustered = torch.nn.functional.normalize(torch.eye(3).repeat_interleave(2, 0) + 0.01, dim=-1)
    mixed = torch.nn.functional.normalize(torch.eye(3).repeat(2, 1) + 0.01, dim=-1)
    assert supcon_loss(clustered, labels, 0.07) < supcon_loss(mixed, labels, 0.07)
    # Hand-checked: two orthogonal pairs, each anchor's only positive is identical (cos 1) and the other is cos 0.
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    tau = 0.5
    expected = -torch.log(torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 2))
    torch.testing.assert_close(supcon_loss(features, torch.tensor([0, 0, 1, 1]), tau), expected)


def test_pseudo_labels_ignore_lora():
    model = tiny_model().eval()
    pixel_values, _ = random_batch(model.config)
    prefix = model.encoder.frozen_prefix(pixel_values, None)
    before = model.encoder.pseudo_labels(prefix)
    randomise_lora(model, std=1.0)
    assert torch.equal(before, model.encoder.pseudo_labels(prefix))


def test_lora_merge_gives_identical_outputs_and_plain_weights():
    model = tiny_model().eval()
    randomise_lora(model)
    pixel_values, ids = random_batch(model.config)
    before = model(pixel_values=pixel_values, input_ids=ids).logits
    model.merge_encoder_lora()
    after = model(pixel_values=pixel_values, input_ids=ids).logits
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)
    assert model.config.lora_merged
    keys = list(model.state_dict())
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    assert "model.encoder.tower.visual.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert not any(p.requires_grad for p in model.encoder.tower.visual.parameters())


def test_maskclip_dense_embeddings_use_each_patch_alone():
    """Self-only attention in the last block: a patch's dense embedding ignores every other patch."""
    model = tiny_model(dense_attention="maskclip").eval()
    pixel_values, _ = random_batch(model.config, batch=1)
    prefix = model.encoder.frozen_prefix(pixel_values, None)
    *_, last_input = model.encoder.tower.adapted_blocks(prefix)
    dense = model.encoder.tower.dense_embeddings(last_input, model.config.num_patches)
    changed = last_input.clone()
    changed[:, 5] += torch.randn(changed.shape[-1])
    dense_changed = model.encoder.tower.dense_embeddings(changed, model.config.num_patches)
    differs = (dense - dense_changed).abs().amax(-1)[0] > 1e-6  # (n,)
    assert differs.nonzero().flatten().tolist() == [4]  # token 5 is patch 4 (token 0 is the class token)


@pytest.mark.parametrize("merged", [False, True], ids=["lora", "merged"])
def test_maskclip_dense_embeddings_equal_the_last_block_under_a_self_only_mask(merged):
    """Each patch alone through the last block (LoRA-adapted), or its value path only (merged or plain attention),
    is MaskCLIP's self-only attention mask on the whole sequence."""
    model = tiny_model(dense_attention="maskclip").eval()
    if merged:
        model.merge_encoder_lora()
        assert type(model.encoder.tower.blocks[-1].attn) is torch.nn.MultiheadAttention  # the value path runs
    tower, n = model.encoder.tower, model.config.num_patches
    pixel_values, _ = random_batch(model.config, batch=2)
    *_, last_input = tower.adapted_blocks(model.encoder.frozen_prefix(pixel_values, None))
    length = last_input.shape[1]
    self_only = torch.full((length, length), float("-inf")).fill_diagonal_(0.0)  # (L, L)
    masked = tower.blocks[-1](last_input, attn_mask=self_only)[:, -n:]  # (B, n, d_v)
    reference = tower.visual.ln_post(masked) @ tower.visual.proj  # (B, n, d_clip)
    torch.testing.assert_close(tower.dense_embeddings(last_input, n), reference)


def _last_input(model, batch: int = 2) -> torch.Tensor:
    pixel_values, _ = random_batch(model.config, batch=batch)
    *_, last_input = model.encoder.tower.adapted_blocks(model.encoder.frozen_prefix(pixel_values, None))
    return last_input  # (B, 1 + n, d_v)


def test_sclip_dense_embeddings_equal_a_per_head_reference():
    """SCLIP written out from nn.MultiheadAttention's weights: per head softmax(q qᵀ/√d_h) + softmax(k kᵀ/√d_h) over
    the patches weighs the values; out_proj, the block's residuals and MLP, ln_post and the projection follow."""
    model = tiny_model(dense_attention="sclip").eval()
    randomise_lora(model)
    model.merge_encoder_lora()
    tower, n = model.encoder.tower, model.config.num_patches
    block = tower.blocks[-1]
    attn = block.attn
    assert type(attn) is torch.nn.MultiheadAttention
    with torch.no_grad():
        last_input = _last_input(model)
        x = last_input[:, -n:]  # (B, n, d_v)
        width, heads = x.shape[-1], attn.num_heads
        head_width = width // heads
        q, k, v = (
            F.linear(block.ln_1(x), weight, bias)  # (B, n, d_v)
            for weight, bias in zip(attn.in_proj_weight.split(width), attn.in_proj_bias.split(width))
        )
        outputs = []
        for h in range(heads):
            part = slice(h * head_width, (h + 1) * head_width)
            qh, kh, vh = q[..., part], k[..., part], v[..., part]  # (B, n, d_h)
            weights = torch.softmax(qh @ qh.mT / head_width**0.5, -1) + torch.softmax(kh @ kh.mT / head_width**0.5, -1)
            outputs.append(weights @ vh)
        y = x + attn.out_proj(torch.cat(outputs, dim=-1))
        y = y + block.mlp(block.ln_2(y))
        reference = tower.visual.ln_post(y) @ tower.visual.proj  # (B, n, d_clip)
        dense = tower.dense_embeddings(last_input, n)
    torch.testing.assert_close(dense, reference)


def test_sclip_dense_embeddings_with_lora_equal_the_merged_tower_and_train_the_adapters():
    model = tiny_model(dense_attention="sclip").eval()
    randomise_lora(model)
    tower, n = model.encoder.tower, model.config.num_patches
    last_input = _last_input(model)
    adapted = tower.dense_embeddings(last_input, n)
    adapted.square().sum().backward()
    attn = tower.blocks[-1].attn
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in attn.lora_A.parameters())
    with torch.no_grad():
        tower.set_adapters_enabled(False)
        frozen = tower.dense_embeddings(last_input, n)
        tower.set_adapters_enabled(True)
        model.merge_encoder_lora()
        merged = tower.dense_embeddings(last_input, n)
    assert not torch.allclose(frozen, adapted)  # the adapted path has the ΔW
    torch.testing.assert_close(adapted.detach(), merged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dense_attention", ["sclip", "maskclip"])
def test_dense_attention_round_trips_through_save_pretrained(dense_attention, tmp_path):
    model = tiny_model(dense_attention=dense_attention).eval()
    model.save_pretrained(tmp_path)
    again = FsgrPmaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert again.config.dense_attention == again.model.encoder.tower.dense_attention == dense_attention


def test_checkpoint_from_before_dense_attention_loads_with_maskclip(tmp_path):
    """A checkpoint saved before the field existed was trained on MaskCLIP's value path, and loads with it."""
    model = tiny_model(dense_attention="maskclip").eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["dense_attention"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    again = FsgrPmaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert again.config.dense_attention == "maskclip"
    last_input = _last_input(model)
    with torch.no_grad():
        expected = model.encoder.tower.dense_embeddings(last_input, model.config.num_patches)
        torch.testing.assert_close(again.encoder.tower.dense_embeddings(last_input, model.config.num_patches), expected)
