"""transformers integration beyond AutoModel: AutoModelForImageTextToText, the image-text-to-text pipeline, prefixes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from conftest import fill_memory, tiny_model
from modeling_fsgr_pma.processing_fsgr_pma import FsgrPmaProcessor
from modeling_fsgr_pma.data.tokenization import train_caption_tokenizer

# A random tiny model repeats BOS (id 1, a special token that decoding drops): suppress it so that captions have words.
GENERATE = {"num_beams": 2, "max_new_tokens": 6, "min_new_tokens": 3, "suppress_tokens": [1]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pipeline_model")
    tokenizer = train_caption_tokenizer(["a red circle on the left", "two blue squares at the top"] * 5, vocab_size=64)
    model = tiny_model(seed=2, vocab_size=len(tokenizer))
    fill_memory(model)
    model.save_pretrained(directory)
    FsgrPmaProcessor.for_config(model.config, tokenizer).save_pretrained(directory)
    return directory


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8))


def test_auto_map_names_image_text_to_text(saved):
    auto_map = json.loads((saved / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == auto_map["AutoModel"]
    model = AutoModelForImageTextToText.from_pretrained(saved, trust_remote_code=True)
    assert type(model).__name__ == "FsgrPmaForConditionalGeneration"


def test_pipeline_captions_equal_generate(saved):
    pipe = pipeline("image-text-to-text", model=str(saved), trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(saved, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    images = [_image(0), _image(1)]
    outputs = pipe(images=images, text=["", ""], generate_kwargs=GENERATE)
    with torch.no_grad():
        ids = model.generate(**processor(images=images, return_tensors="pt"), **GENERATE)
    expected = processor.batch_decode(ids, skip_special_tokens=True)
    assert [output[0]["generated_text"] if isinstance(output, list) else output["generated_text"] for output in outputs] == expected
    assert all(len(text.split()) >= 1 for text in expected)


def test_prefix_is_continued(saved):
    model = AutoModelForImageTextToText.from_pretrained(saved, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    inputs = processor(images=[_image(3)], text=["a red"], return_tensors="pt")
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert processor.tokenizer.eos_token_id not in inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ids = model.generate(**inputs, **GENERATE)
    assert torch.equal(ids[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert processor.batch_decode(ids, skip_special_tokens=True)[0].startswith("a red")


@pytest.mark.parametrize(
    "text, message",
    [(["a red", "two blue squares at"], "same number of tokens"), (["a", "a", "a"], "3 caption prefixes for 2 images")],
)
def test_bad_prefixes(saved, text, message):
    processor = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    with pytest.raises(ValueError, match=message):
        processor(images=[_image(0), _image(1)], text=text, return_tensors="pt")


def test_text_alone_is_whole_captions(saved):
    processor = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    batch = processor(text=["a red circle", "two blue squares at the top"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert (batch["input_ids"][:, 0] == processor.tokenizer.bos_token_id).all()
    assert processor.tokenizer.eos_token_id in batch["input_ids"][0].tolist()
