"""`scripts/evaluate_captions.py`: the metrics file (captions, reference loss, hallucination by kind, CHAIR and the error
rates on the scene world) on tiny worlds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scripts import evaluate_captions
from conftest import tiny_model
from modeling_fsgr_pma.data.captions import load_caption_split
from modeling_fsgr_pma.processing_fsgr_pma import FsgrPmaProcessor
from modeling_fsgr_pma.data.synthetic import generate_world, hallucination_breakdown
from modeling_fsgr_pma.data.tokenization import train_caption_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A 32 px world (6 test images) and an untrained tiny model saved with its processor."""
    root = tmp_path_factory.mktemp("evaluate")
    generate_world(root / "world", num_images=20, seed=0, image_size=32, split_fractions={
        "validation": 0.1, "test": 0.3, "test_novel": 0.1})
    captions = [c for refs in load_caption_split(root / "world", "train")["captions"] for c in refs]
    tokenizer = train_caption_tokenizer(captions, vocab_size=64)
    model = tiny_model(vocab_size=len(tokenizer)).eval()
    model.generation_config.max_new_tokens, model.generation_config.num_beams = 5, 1
    model.save_pretrained(root / "model")
    FsgrPmaProcessor.for_config(model.config, tokenizer).save_pretrained(root / "model")
    return {"world": root / "world", "model": root / "model", "root": root}


def test_metrics_file_has_captions_reference_loss_and_hallucination_kinds(saved):
    output = saved["root"] / "metrics.json"
    result = evaluate_captions.main([
        "--model", str(saved["model"]), "--data", str(saved["world"]), "--split", "test", "--output", str(output),
    ])
    written = json.loads(output.read_text())
    assert written["num_images"] == 6 and len(written["predictions"]) == 6
    assert written["CIDEr"] == pytest.approx(result["CIDEr"])
    assert written["reference_cross_entropy"] > 0
    objects = dict(zip(load_caption_split(saved["world"], "test")["image_id"],
                       load_caption_split(saved["world"], "test")["objects"]))
    expected = hallucination_breakdown(written["predictions"], objects)
    for key in ("hallucination_rate", "hallucination_wrong_shape", "hallucination_wrong_colour",
                "hallucination_wrong_binding"):
        assert written[key] == expected[key]


def test_reference_cross_entropy_is_the_mean_token_loss_of_every_reference(saved):
    """The pooled loss equals the loss computed reference by reference with the model's own forward."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from modeling_fsgr_pma.cli.loading import load_pretrained
    from modeling_fsgr_pma.training.steps import CaptionCollator, reference_cross_entropy

    model, processor = load_pretrained(str(saved["model"]))
    data = load_caption_split(saved["world"], "test")
    data = data.add_column("row", list(range(len(data))))
    references = list(data["captions"])
    collator = CaptionCollator(processor, max_length=model.config.max_position_embeddings, with_captions=False)
    loader = DataLoader(data, batch_size=4, collate_fn=collator)  # two batches, one short
    pooled = reference_cross_entropy(Accelerator(), model, loader, processor.tokenizer, references, 24)

    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in range(len(data)):
            pixels = processor(images=[data[row]["image"]], return_tensors="pt")["pixel_values"]
            for caption in references[row]:
                ids = processor.tokenizer([caption], truncation=True, max_length=24, return_tensors="pt")["input_ids"]
                logits = model(pixel_values=pixels, input_ids=ids).logits
                total += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
                tokens += ids.shape[1] - 1
    assert pooled == pytest.approx(total / tokens, rel=1e-4)


def test_metrics_file_has_chair_and_error_rates_on_the_scene_world(saved):
    """On the scene world the objects have categories: CHAIR and the error rates replace the shape breakdown."""
    from modeling_fsgr_pma.data import scenes
    from modeling_fsgr_pma.evaluation.faithfulness import faithfulness_metrics

    world = saved["root"] / "scenes"
    fractions = dict.fromkeys(scenes.SPLITS[1:], 0.5)
    scenes.generate_world(world, num_images=4, seed=0, image_size=32, split_fractions=fractions)
    output = saved["root"] / "metrics_scenes.json"
    evaluate_captions.main([
        "--model", str(saved["model"]), "--data", str(world), "--split", "test_out_domain", "--output", str(output),
    ])
    written = json.loads(output.read_text())
    data = load_caption_split(world, "test_out_domain")
    ids = list(data["image_id"])
    expected = faithfulness_metrics(
        written["predictions"], dict(zip(ids, data["objects"])), dict(zip(ids, data["relations"]))
    )
    assert {key: written[key] for key in expected} == expected
    assert "hallucination_rate" not in written
