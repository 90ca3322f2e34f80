"""scripts/push_to_hub.py --dry-run: the upload folder loads offline, and its model card metadata parses."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModel

from scripts import push_to_hub
from conftest import fill_memory, random_batch, randomise_lora, tiny_model
from modeling_fsgr_pma.processing_fsgr_pma import FsgrPmaProcessor
from modeling_fsgr_pma.cli.loading import training_data
from modeling_fsgr_pma.data.tokenization import train_caption_tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    model = tiny_model(vocab_size=64)
    fill_memory(model)
    randomise_lora(model)
    model.save_pretrained(directory)
    tokenizer = train_caption_tokenizer(["a red circle", "two blue squares"] * 5, vocab_size=64)
    FsgrPmaProcessor.for_config(model.config, tokenizer).save_pretrained(directory)
    metrics = directory / "metrics_test.json"
    metrics.write_text(json.dumps({
        "Bleu_4": 0.5, "METEOR": 0.3, "ROUGE_L": 0.6, "CIDEr": 1.25, "SPICE": None, "hallucination_rate": 0.1,
        "split": "test", "num_images": 10, "num_beams": 3, "max_new_tokens": 20, "skipped": {"SPICE": "offline"},
    }))
    pixel_values, ids = random_batch(model.config, seed=4)
    with torch.no_grad():
        logits = model.eval()(pixel_values=pixel_values, input_ids=ids).logits
    return directory, metrics, (pixel_values, ids, logits)


def test_dry_run_folder_loads_and_card_validates(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory, metrics, (pixel_values, ids, logits) = trained
    out = tmp_path / "upload"
    push_to_hub.main(["--model", str(directory), "--repo-id", "someone/fsgr-pma-tiny", "--dry-run", str(out),
                         "--metrics", str(metrics)])
    names = {p.name for p in out.iterdir()}
    for required in ("model.safetensors", "config.json", "modeling_fsgr_pma.py", "configuration_fsgr_pma.py",
                     "processing_fsgr_pma.py", "tokenizer.json", "processor_config.json", "generation_config.json",
                     "README.md"):
        assert required in names, required
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    assert model.config.lora_merged
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixel_values, input_ids=ids).logits, logits, rtol=1e-4, atol=1e-5)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-to-text"
    values = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert values == {"CIDEr": 1.25, "Bleu_4": 0.5, "METEOR": 0.3, "ROUGE_L": 0.6}
    assert "trust_remote_code=True" in card.text and "beam size 3" in card.text and "{{" not in card.text
    assert training_data(str(out)) == push_to_hub.SCENE_WORLD  # what the CLI and the app say the model knows
    assert "K-Means refreshed every" in card.text  # the memory row


def test_bad_repo_id_and_missing_metrics_are_clear_errors(trained, tmp_path):
    directory, _, _ = trained
    push = push_to_hub
    with pytest.raises(SystemExit):
        push.parse_args(["--model", str(directory), "--repo-id", "no-slash"])
    with pytest.raises(SystemExit):
        push.parse_args(["--model", str(directory), "--repo-id", "a/b", "--metrics", str(tmp_path / "none.json")])


def test_the_card_names_the_log_prior_as_our_extension_only_where_it_is_on():
    push = push_to_hub
    assert "our extension" in push.memory_description(tiny_model(memory_prior=True).config)
    assert "our extension" not in push.memory_description(tiny_model().config)
    assert push.memory_description(tiny_model(use_memory=False).config).startswith("off")
