"""FsgrPmaConfig: presets load, JSON round trip, impossible values raise a ValueError naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modeling_fsgr_pma import FsgrPmaConfig

PRESETS = sorted((Path(__file__).parents[1] / "configuration" / "model").glob("*.json"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_load_and_round_trip(path, tmp_path):
    config = FsgrPmaConfig.from_json_file(path)
    config.save_pretrained(tmp_path)
    again = FsgrPmaConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()


def test_expected_presets_exist():
    assert {p.stem for p in PRESETS} >= {"tiny", "vit-b16", "vit-l14"}


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_name_their_dense_attention(path):
    """FSGR's SCLIP for the COCO presets; MaskCLIP for the tiny ones, whose shipped CLIPs were pre-trained on it."""
    expected = "maskclip" if path.stem.startswith("tiny") else "sclip"
    assert json.loads(path.read_text()).get("dense_attention") == expected


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size"),
        ({"concept_top_k": 80, "num_concepts": 64}, "concept_top_k"),
        ({"lora_first_block": 5}, "lora_first_block"),
        ({"num_prototypes": 500, "memory_window": 2, "memory_tokens_per_step": 10}, "num_prototypes"),
        ({"prototype_dtype": "int8"}, "prototype_dtype"),
        ({"dense_attention": "clip"}, r"dense_attention must be one of \('sclip', 'maskclip'\)"),
        ({"eos_token_id": 99, "vocab_size": 50}, "eos_token_id"),
        ({"concept_names": ["a", "b"], "num_concepts": 3, "concept_top_k": 2}, "concept_names"),
        ({"clip_config": {"embed_dim": 32, "vision_cfg": {"image_size": 30, "patch_size": 8, "layers": 2}}}, "image_size"),
        ({"dropout": 1.5}, "dropout"),
        ({"memory_knn": 0}, "memory_knn"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ],
)
def test_impossible_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        FsgrPmaConfig(**overrides)


def test_memory_settings_are_ignored_when_memory_is_off():
    config = FsgrPmaConfig(use_memory=False, num_prototypes=10**6)
    assert not config.use_memory
