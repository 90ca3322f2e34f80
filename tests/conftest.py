"""Shared fixtures: a tiny config (hidden 32, 2 layers, image 32) in the style of transformers' ModelTester."""

from __future__ import annotations

import pytest
import torch

from modeling_fsgr_pma import FsgrPmaConfig, FsgrPmaForConditionalGeneration

PAD, BOS, EOS = 0, 1, 2


def tiny_config(**overrides) -> FsgrPmaConfig:
    """A model that runs a forward pass in milliseconds; memory small enough to fill in a few steps."""
    settings = dict(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=24,
        num_concepts=12,
        concept_top_k=4,
        supcon_dim=16,
        num_prototypes=6,
        memory_window=4,
        memory_tokens_per_step=16,
        memory_knn=3,
        memory_kmeans_iters=5,
        dropout=0.0,
    )
    settings.update(overrides)
    return FsgrPmaConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> FsgrPmaForConditionalGeneration:
    torch.manual_seed(seed)
    return FsgrPmaForConditionalGeneration(tiny_config(**overrides))


def random_batch(config: FsgrPmaConfig, batch: int = 2, length: int = 7, seed: int = 0):
    """Images and BOS-led captions ending in EOS, with no special ids inside."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, config.image_size, config.image_size, generator=generator)
    ids = torch.randint(3, config.vocab_size, (batch, length), generator=generator)
    ids[:, 0], ids[:, -1] = BOS, EOS
    return pixel_values, ids


def randomise_lora(model: FsgrPmaForConditionalGeneration, std: float = 0.05) -> None:
    """A trained adapter instead of LoRA's zero start (B = 0 makes ΔW and A's gradient exactly zero)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=std)


def fill_memory(model: FsgrPmaForConditionalGeneration, steps: int = 4, seed: int = 0) -> None:
    """Run training forwards until the banks hold enough entries, then refresh the prototypes."""
    model.train()
    for step in range(steps):
        pixel_values, ids = random_batch(model.config, batch=4, length=9, seed=seed + step)
        with torch.no_grad():
            model(pixel_values=pixel_values, input_ids=ids)
    model.refresh_memory(seed=seed, backend="torch")
    model.eval()


@pytest.fixture
def model() -> FsgrPmaForConditionalGeneration:
    return tiny_model().eval()


@pytest.fixture
def model_with_memory() -> FsgrPmaForConditionalGeneration:
    model = tiny_model()
    fill_memory(model)
    return model
