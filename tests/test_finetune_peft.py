"""PEFT LoRA on a trained model: the shipped configs, scripts/finetune_peft.py end to end, adapter round trips, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from scripts import finetune_peft
from conftest import fill_memory, random_batch, tiny_model
from modeling_fsgr_pma import FsgrPmaConfig, FsgrPmaForConditionalGeneration
from modeling_fsgr_pma.training.adapters import (
    PROTOTYPES_FILE,
    apply_lora,
    load_adapter,
    new_word_token_ids,
    prototype_state,
    read_lora_config,
)
from modeling_fsgr_pma.data.captions import load_caption_split
from modeling_fsgr_pma.processing_fsgr_pma import FsgrPmaProcessor
from modeling_fsgr_pma.data import scenes
from modeling_fsgr_pma.data.tokenization import train_caption_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# The tiny test tower has 2 blocks and adapts block 1 (tiny_config's lora_first_block).
TEST_LORA = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": r"model\.encoder\.tower\.visual\.transformer\.resblocks\.1\.(attn|mlp\.c_fc|mlp\.c_proj)"
    r"|model\.decoder\.layers\.\d+\.(self_attn\.qkv_proj|self_attn\.out_proj|cross_attn\.q_proj|cross_attn\.v_proj)",
}


def _adapted_modules(peft_model) -> list[str]:
    return sorted({name.split(".lora_A")[0] for name, _ in peft_model.named_parameters() if ".lora_A" in name})


@pytest.mark.parametrize("preset, lora", [("tiny", "default"), ("vit-b16", "vit-b16")])
def test_shipped_lora_configs_adapt_upper_vision_blocks_and_decoder_attention(preset, lora):
    config = FsgrPmaConfig.from_json_file(ROOT / f"configuration/model/{preset}.json")
    config.lora_merged = True  # a release: plain tower weights, as finetune_peft.py requires
    peft_model = apply_lora(FsgrPmaForConditionalGeneration(config), read_lora_config(ROOT / f"configuration/lora/{lora}.json"))
    adapted = _adapted_modules(peft_model)
    vision = {int(name.split("resblocks.")[1].split(".")[0]) for name in adapted if "resblocks" in name}
    assert vision == set(range(config.lora_first_block, config.vision_layers))
    decoder = [name for name in adapted if ".decoder.layers." in name]
    assert len(decoder) == 6 * config.num_hidden_layers  # qkv, out; cross q, k, v, out
    assert all("mlp" not in name for name in decoder)
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert 0 < trainable / total < 0.05


def test_new_word_token_ids_are_the_pieces_of_unknown_words():
    tokenizer = train_caption_tokenizer(["a red circle", "a blue square", "red squares"] * 4, vocab_size=60)
    known = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    assert new_word_token_ids(["a red circle"], tokenizer) == []
    pieces = new_word_token_ids(["a red hexagon"], tokenizer)
    assert pieces == sorted(set(tokenizer("hexagon", add_special_tokens=False)["input_ids"]))
    assert len(pieces) > 1 and not set(pieces) & set(known[:2])


# ----------------------------------------------------------------------------------------------------------------
# scripts/finetune_peft.py end to end on a tiny world of the second domain
@pytest.fixture(scope="module")
def base_and_world(tmp_path_factory):
    """A released tiny base model (LoRA merged, prototypes refreshed) and a tiny world of the README's new domain,
    `scenes-b` (every image holds a category the scene world's captions never name)."""
    root = tmp_path_factory.mktemp("peft")
    world = root / "world"
    scenes.generate_world(world, num_images=24, seed=1, image_size=32, domain=scenes.DOMAIN_B)
    captions = [c for caps in load_caption_split(world, "train")["captions"] for c in caps]
    tokenizer = train_caption_tokenizer(captions[:20], 60)
    model = tiny_model(seed=3, vocab_size=len(tokenizer), max_position_embeddings=64, memory_refresh_every=2,
                       memory_window=2)
    fill_memory(model)
    model.merge_encoder_lora()
    base = root / "base"
    model.save_pretrained(base)
    FsgrPmaProcessor.for_config(model.config, tokenizer).save_pretrained(base)
    lora = root / "lora.json"
    lora.write_text(json.dumps(TEST_LORA))
    return base, world, lora


def _finetune(base: Path, world: Path, lora: Path, output: Path, memory: str) -> dict:
    return finetune_peft.main([
        "--base-model", str(base), "--data", str(world), "--output-dir", str(output), "--lora-config", str(lora),
        "--memory", memory, "--steps", "4", "--batch-size", "8", "--eval-max-images", "4", "--num-beams", "1",
        "--max-new-tokens", "5", "--learning-rate", "1e-2", "--warmup-steps", "1", "--kmeans-backend", "torch",
    ])  # fmt: skip


@pytest.mark.parametrize("memory", ["frozen", "refresh"])
def test_finetune_adapter_reloads_onto_fresh_base_and_merges(base_and_world, tmp_path, memory):
    base_dir, world, lora = base_and_world
    output = tmp_path / "adapter"
    summary = _finetune(base_dir, world, lora, output, memory)
    assert summary["steps"] == 4 and 0 < summary["trainable_share"] < 0.2
    assert (output / "adapter_model.safetensors").is_file() and (output / "adapter_config.json").is_file()
    assert (output / PROTOTYPES_FILE).is_file() == (memory == "refresh")
    lora_weights = load_file(output / "adapter_model.safetensors")
    assert lora_weights and all("lora_" in name or "trainable_tokens" in name for name in lora_weights)
    assert any(t.abs().sum() > 0 for name, t in lora_weights.items() if "lora_B" in name)  # it trained

    base = AutoModel.from_pretrained(base_dir, trust_remote_code=True).eval()
    base_prototypes = prototype_state(base)
    adapted = load_adapter(base, output).eval()
    merged = AutoModel.from_pretrained(output / "merged", trust_remote_code=True).eval()
    pixel_values, ids = random_batch(base.config, batch=3, seed=7)
    with torch.no_grad():
        adapter_logits = adapted(pixel_values=pixel_values, input_ids=ids).logits
        merged_logits = merged(pixel_values=pixel_values, input_ids=ids).logits
        adapter_captions = adapted.generate(pixel_values=pixel_values, num_beams=2, max_new_tokens=6)
        merged_captions = merged.generate(pixel_values=pixel_values, num_beams=2, max_new_tokens=6)
    torch.testing.assert_close(adapter_logits, merged_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(adapter_captions, merged_captions)

    # Memory: frozen keeps the base prototypes; refresh carries the new ones in prototypes.safetensors.
    after = prototype_state(adapted.get_base_model())
    assert all(torch.equal(after[k], prototype_state(merged)[k]) for k in after)
    changed = any(not torch.equal(after[k], base_prototypes[k]) for k in after)
    assert changed == (memory == "refresh")
    without_adapter = AutoModel.from_pretrained(base_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        base_logits = without_adapter(pixel_values=pixel_values, input_ids=ids).logits
    assert not torch.allclose(base_logits, adapter_logits, atol=1e-4)


@pytest.fixture(scope="module")
def adapter(base_and_world, tmp_path_factory) -> Path:
    base_dir, world, lora = base_and_world
    output = tmp_path_factory.mktemp("adapter") / "frozen"
    _finetune(base_dir, world, lora, output, "frozen")
    return output


def test_cli_caption_with_adapter_equals_merged_model(base_and_world, adapter, tmp_path, capsys):
    from modeling_fsgr_pma.cli.main import main

    image = tmp_path / "image.png"
    load_caption_split(base_and_world[1], "test")[0]["image"].save(image)
    fast = ["--num-beams", "2", "--max-new-tokens", "6", "--json", str(image)]
    assert main(["caption", "--model", str(base_and_world[0]), "--adapter", str(adapter), *fast]) == 0
    with_adapter = json.loads(capsys.readouterr().out)
    assert main(["caption", "--model", str(adapter / "merged"), *fast]) == 0
    assert with_adapter == json.loads(capsys.readouterr().out)
    assert main(["caption", "--model", str(base_and_world[0]), "--adapter", str(tmp_path), *fast]) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err


def test_an_adapter_saved_before_the_base_model_existed_still_loads(base_and_world, adapter, tmp_path):
    """Adapters trained when the captioner's modules were `encoder.*` / `decoder.*` (before `model.`): weights, the
    `target_modules` pattern and refreshed prototypes are mapped onto the current names; the fingerprint matches."""
    base_dir, _, _ = base_and_world
    old = tmp_path / "old"
    old.mkdir()
    for name in ("adapter_config.json", "fsgr_pma_base.json"):
        (old / name).write_text((adapter / name).read_text())
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = config["target_modules"].replace("model\\.", "")
    (old / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(adapter / "adapter_model.safetensors")
    assert all(key.startswith("base_model.model.model.") for key in weights)
    save_file({key.replace("base_model.model.model.", "base_model.model.", 1): t for key, t in weights.items()},
              old / "adapter_model.safetensors")
    base = AutoModel.from_pretrained(base_dir, trust_remote_code=True).eval()
    prototypes = {key.removeprefix("model."): t + 1.0 for key, t in prototype_state(base).items()}  # refreshed
    save_file(prototypes, old / PROTOTYPES_FILE)

    from_old = load_adapter(base, old).eval()
    expected = load_adapter(AutoModel.from_pretrained(base_dir, trust_remote_code=True).eval(), adapter).eval()
    with torch.no_grad():
        for layer in expected.get_base_model().memory_layers():
            layer.prototype_keys.add_(1.0)
            layer.prototype_values.add_(1.0)
        pixel_values, ids = random_batch(base.config, seed=4)
        torch.testing.assert_close(from_old(pixel_values=pixel_values, input_ids=ids).logits,
                                   expected(pixel_values=pixel_values, input_ids=ids).logits)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
def test_adapter_for_another_base_is_refused(base_and_world, adapter):
    base_dir, _, _ = base_and_world
    output = adapter
    other = AutoModel.from_pretrained(base_dir, trust_remote_code=True)
    with torch.no_grad():
        other.decoder.embed_tokens.weight.add_(0.01)  # another training run of the same architecture
    with pytest.raises(ValueError, match="trained on another base model"):
        load_adapter(other, output)


def test_not_an_adapter_directory(tmp_path, model):
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        load_adapter(model, tmp_path)


def test_lora_config_naming_no_module(tmp_path, model):
    path = tmp_path / "lora.json"
    path.write_text(json.dumps({"r": 4, "target_modules": ["q_proj_that_does_not_exist"]}))
    with pytest.raises(ValueError, match="match no module of this model"):
        apply_lora(model, read_lora_config(path))


@pytest.mark.parametrize(
    "content, message",
    [("{not json", "not valid JSON"), ('{"r": 4, "rank_of_doom": 1}', "rank_of_doom"),
     ('{"peft_type": "IA3"}', "only LORA")],
)
def test_bad_lora_config_files(tmp_path, content, message):
    path = tmp_path / "lora.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_lora_config(path)
    with pytest.raises(ValueError, match="does not exist"):
        read_lora_config(tmp_path / "missing.json")


def test_unmerged_base_is_refused(base_and_world, tmp_path):
    _, world, lora = base_and_world
    unmerged = tmp_path / "unmerged"
    tiny_model().save_pretrained(unmerged)
    base_dir = base_and_world[0]
    for path in base_dir.iterdir():  # the processor files and code
        if not (unmerged / path.name).exists():
            (unmerged / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="unmerged"):
        _finetune(unmerged, world, lora, tmp_path / "out", "frozen")


def test_missing_base_model_is_named(base_and_world, tmp_path):
    _, world, lora = base_and_world
    with pytest.raises(ValueError, match="model directory not found"):
        _finetune(tmp_path / "no-such-model", world, lora, tmp_path / "out", "frozen")
