"""Round trips: save_pretrained → a fresh, offline process loading with AutoModel/AutoProcessor(trust_remote_code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import fill_memory, random_batch, randomise_lora, tiny_model
from modeling_fsgr_pma.processing_fsgr_pma import FsgrPmaProcessor
from modeling_fsgr_pma.data.tokenization import train_caption_tokenizer

RELOAD_SCRIPT = """
import sys, torch
from transformers import AutoModel, AutoProcessor
directory = sys.argv[1]
model = AutoModel.from_pretrained(directory, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
batch = torch.load(directory + "/inputs.pt")
with torch.no_grad():
    out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"])
prototypes = {k: v for k, v in model.state_dict().items() if "prototype" in k}
captions = processor.batch_decode(model.generate(pixel_values=batch["pixel_values"], max_new_tokens=6))
torch.save({"logits": out.logits, "prototypes": prototypes, "captions": captions}, directory + "/outputs.pt")
"""


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("saved")
    model = tiny_model(seed=3, vocab_size=64)
    fill_memory(model)
    randomise_lora(model)  # a non-trivial LoRA state must survive the round trip
    tokenizer = train_caption_tokenizer(["a red circle", "two blue squares above a star"] * 5, vocab_size=64)
    model.save_pretrained(directory)
    FsgrPmaProcessor.for_config(model.config, tokenizer).save_pretrained(directory)
    pixel_values, ids = random_batch(model.config, seed=7)
    torch.save({"pixel_values": pixel_values, "input_ids": ids}, directory / "inputs.pt")
    with torch.no_grad():
        expected = {
            "logits": model(pixel_values=pixel_values, input_ids=ids).logits,
            "prototypes": {k: v for k, v in model.state_dict().items() if "prototype" in k},
        }
    return directory, expected


def test_saved_directory_holds_weights_code_and_no_pickle(saved_model):
    directory, _ = saved_model
    names = {p.name for p in directory.iterdir()}
    for required in ("config.json", "model.safetensors", "configuration_fsgr_pma.py", "modeling_fsgr_pma.py"):
        assert required in names
    assert "processing_fsgr_pma.py" in names and "tokenizer.json" in names
    assert not any(name.endswith((".bin", ".pkl", ".pickle")) for name in names)
    weights = load_file(directory / "model.safetensors")
    assert "model.encoder.codebook.embeddings" in weights
    assert "model.decoder.layers.0.self_attn.prototype_keys" in weights
    assert "model.decoder.layers.1.self_attn.prototype_ready" in weights
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_fsgr_pma.FsgrPmaForConditionalGeneration"


def test_fresh_offline_process_gives_identical_logits_and_prototypes(saved_model):
    directory, expected = saved_model
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(directory / "hf_home")}
    # Run from an empty folder so that the repository checkout is not what gets imported.
    subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(directory)], check=True, env=env, cwd=directory, timeout=300
    )
    reloaded = torch.load(directory / "outputs.pt")
    assert torch.equal(reloaded["logits"], expected["logits"])
    assert reloaded["prototypes"].keys() == expected["prototypes"].keys()
    for key, value in expected["prototypes"].items():
        assert torch.equal(reloaded["prototypes"][key], value), key
    assert len(reloaded["captions"]) == 2


def test_in_process_reload_and_merged_lora_round_trip(saved_model, tmp_path):
    from modeling_fsgr_pma import FsgrPmaForConditionalGeneration

    directory, expected = saved_model
    model = FsgrPmaForConditionalGeneration.from_pretrained(directory).eval()
    batch = torch.load(directory / "inputs.pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.equal(logits, expected["logits"])
    model.merge_encoder_lora()
    model.save_pretrained(tmp_path)
    merged = FsgrPmaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert merged.config.lora_merged and not any("lora_" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(**batch).logits, expected["logits"], rtol=1e-4, atol=1e-5)
