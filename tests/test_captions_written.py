"""Captions are written as people write them (`a red ring, a black cross`, no space before punctuation) on every
path a user takes: `generate` + `batch_decode`, the image-text-to-text pipeline, `fsgr-pma caption`, the web app and
`scripts/evaluate_captions.py`'s files; the metrics do not move for spacing alone. And the CLI says what the model
was trained on, from its model card.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import AutoModel, AutoProcessor, pipeline

from conftest import tiny_model
from modeling_fsgr_pma.cli.loading import UNKNOWN_TRAINING_DATA, training_data
from modeling_fsgr_pma.cli.main import main as cli_main
from modeling_fsgr_pma.data.captions import load_caption_split
from modeling_fsgr_pma.data.synthetic import generate_world
from modeling_fsgr_pma.data.tokenization import train_caption_tokenizer
from modeling_fsgr_pma.evaluation.metrics import compute_caption_metrics
from modeling_fsgr_pma.processing_fsgr_pma import FsgrPmaProcessor
from scripts import evaluate_captions

SPACED = re.compile(r" [,.;:!?)]")  # a space before punctuation: what the captions must never show
WRITTEN = ["there is a red ring, a black cross and a white star.", "a man's t-shirt (blue): it isn't red!"]
CARD = ("---\ndatasets:\n- synthetic-shapes\n---\n# m\n\n"
        "## Training data\n\nProcedural shapes\non plain backgrounds.\n\n## Model\n")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A 32 px world and an untrained tiny model that may only say `a`, `red`, `ring` and `,` (8 tokens)."""
    root = tmp_path_factory.mktemp("written")
    generate_world(root / "world", num_images=20, seed=0, image_size=32,
                   split_fractions={"validation": 0.1, "test": 0.3, "test_novel": 0.1})
    captions = [c for refs in load_caption_split(root / "world", "train")["captions"] for c in refs]
    tokenizer = train_caption_tokenizer(captions + WRITTEN, vocab_size=96)
    model = tiny_model(vocab_size=len(tokenizer)).eval()
    allowed = {tokenizer.convert_tokens_to_ids(f"{word}</w>") for word in ("a", "red", "ring", ",")}
    generation = model.generation_config
    generation.suppress_tokens = [i for i in range(len(tokenizer)) if i not in allowed]
    generation.num_beams, generation.min_new_tokens, generation.max_new_tokens = 1, 8, 8
    generation.no_repeat_ngram_size = 2  # the model says one word over and over: make it say others
    # Whatever the image, the decoder's last hidden state is the comma's embedding: the comma scores highest, and
    # the n-gram limit puts the other allowed words between the commas (`, , ring, a, red,`).
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    with torch.no_grad():
        model.model.decoder.norm.weight.zero_()
        model.model.decoder.norm.bias.copy_(model.model.decoder.embed_tokens.weight[comma])
    model.save_pretrained(root / "model")
    FsgrPmaProcessor.for_config(model.config, tokenizer).save_pretrained(root / "model")
    return {"world": root / "world", "model": root / "model", "root": root}


def _images(count: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(count)]


def _written(captions: list[str]) -> None:
    """No space before punctuation, and at least one comma right after a word (so the check had work to do)."""
    assert not any(SPACED.search(caption) for caption in captions), captions
    assert any(re.search(r"\w,", caption) for caption in captions), captions


def test_saved_tokenizer_decodes_as_written(saved):
    processor = AutoProcessor.from_pretrained(saved["model"], trust_remote_code=True)
    plain = Tokenizer.from_file(str(saved["model"] / "tokenizer.json"))  # no transformers: the decoder is in the file
    for text in WRITTEN:
        ids = processor.tokenizer(text)["input_ids"]
        assert processor.decode(ids, skip_special_tokens=True) == text
        assert plain.decode(plain.encode(text).ids) == text


def test_generate_and_pipeline(saved):
    model = AutoModel.from_pretrained(saved["model"], trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(saved["model"], trust_remote_code=True)
    images = _images()
    with torch.inference_mode():
        ids = model.generate(**processor(images=images, return_tensors="pt"))
    captions = processor.batch_decode(ids, skip_special_tokens=True)
    _written(captions)
    pipe = pipeline("image-text-to-text", model=str(saved["model"]), trust_remote_code=True)
    outputs = pipe(images=images, text=[""] * len(images))
    texts = [output[0]["generated_text"] if isinstance(output, list) else output["generated_text"] for output in outputs]
    assert texts == captions


def test_cli_and_app(saved, tmp_path, capsys):
    from scripts import app

    paths = []
    for index, image in enumerate(_images()):
        paths.append(str(tmp_path / f"{index}.png"))
        image.save(paths[-1])
    assert cli_main(["caption", "--model", str(saved["model"]), *paths]) == 0  # decoding: generation_config.json
    captured = capsys.readouterr()
    cli = [line.split("\t")[1] for line in captured.out.splitlines()]
    _written(cli)
    said = [line for line in captured.err.splitlines() if line.startswith("fsgr-pma")]  # after the loading bar
    assert said[0] == f"fsgr-pma: {saved['model']} was trained on: {UNKNOWN_TRAINING_DATA}"

    model = AutoModel.from_pretrained(saved["model"], trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(saved["model"], trust_remote_code=True)
    captioner = app.Captioner(model, processor, "cpu", batch_size=4, max_images=8, max_pixels=1_000_000)
    markdown = captioner.caption_batch([[(path, None) for path in paths]], [1], [8])[0][0]  # the same settings
    assert markdown.splitlines() == [f"- **{index}\\.png**: {app.escape_markdown(c)}" for index, c in enumerate(cli)]


def test_training_data_from_the_model_card(tmp_path, capsys):
    assert training_data(str(tmp_path)) == UNKNOWN_TRAINING_DATA
    (tmp_path / "README.md").write_text(CARD)
    assert training_data(str(tmp_path)) == "Procedural shapes on plain backgrounds."
    (tmp_path / "README.md").write_text(CARD.split("## Training data")[0])
    assert training_data(str(tmp_path)) == "synthetic-shapes"  # no section: the card's datasets metadata
    assert cli_main(["caption", "--help"]) == 0
    assert "trained on" in " ".join(capsys.readouterr().out.split())


def test_evaluation_files_and_metrics(saved):
    output = saved["root"] / "metrics.json"
    written = evaluate_captions.main([
        "--model", str(saved["model"]), "--data", str(saved["world"]), "--split", "test", "--output", str(output),
    ])
    _written(list(json.loads(output.read_text())["predictions"].values()))
    assert 0 <= written["repeated_trigram_rate"] <= 1 and written["no_repeat_ngram_size"] == 2
    # The metrics tokenise both sides: spacing alone does not move a score.
    references = {"1": ["a red ring, a black cross"], "2": ["a white star."]}
    tight = compute_caption_metrics({"1": "a red ring, a cross", "2": "a star."}, references, names=("CIDEr", "Bleu_4"))
    loose = compute_caption_metrics({"1": "a red ring , a cross", "2": "a star ."}, references, names=("CIDEr", "Bleu_4"))
    assert tight["CIDEr"] == pytest.approx(loose["CIDEr"]) and tight["Bleu_4"] == pytest.approx(loose["Bleu_4"])
