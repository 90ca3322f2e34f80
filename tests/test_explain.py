"""`modeling_fsgr_pma.cli.explain` and `fsgr-pma explain`: attention reductions, memory states, the figure, exit codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fill_memory, tiny_model
from PIL import Image

from modeling_fsgr_pma.cli.main import main
from modeling_fsgr_pma.cli.explain import (
    MEMORY_ACTIVE,
    MEMORY_NOT_REFRESHED,
    MEMORY_OFF,
    Explanation,
    concept_legend,
    explain_image,
    forward_with_attentions,
    memory_usage,
    model_view,
    patch_heatmaps,
    plot_explanation,
    token_texts,
)
from modeling_fsgr_pma.processing_fsgr_pma import FsgrPmaProcessor
from modeling_fsgr_pma.data.tokenization import train_caption_tokenizer

MIN_WORDS = 3


@pytest.fixture(scope="module")
def tokenizer():
    return train_caption_tokenizer(["a red circle", "two blue squares"] * 5, vocab_size=64)


def _model(tokenizer, memory: str = "off", **overrides):
    """A tiny eval model whose greedy captions have at least MIN_WORDS ordinary tokens."""
    model = tiny_model(vocab_size=len(tokenizer), use_memory=memory != "off", **overrides)
    if memory == "refreshed":
        fill_memory(model)
    model.generation_config.suppress_tokens = [tokenizer.pad_token_id, tokenizer.bos_token_id,
                                               tokenizer.unk_token_id]
    model.generation_config.min_new_tokens = MIN_WORDS
    return model.eval()


def _image(size: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _explain(tokenizer, memory: str = "off", **overrides) -> tuple[Explanation, object]:
    model = _model(tokenizer, memory, **overrides)
    processor = FsgrPmaProcessor.for_config(model.config, tokenizer)
    return explain_image(model, processor, _image(model.config.image_size), max_new_tokens=6), model


# ----------------------------------------------------------------------------------------------------------------
# Pure reductions
def test_patch_heatmaps_mean_over_layers_and_heads():
    attention = torch.rand(2, 1, 3, 5, 16).softmax(-1)  # (L, B, heads, T, 16 patches)
    heatmaps = patch_heatmaps(list(attention), num_patches=16)
    assert heatmaps.shape == (5, 4, 4)
    expected = attention[:, 0].mean(dim=(0, 1)).reshape(5, 4, 4)  # (T, g, g)
    np.testing.assert_allclose(heatmaps, expected.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="square"):
        patch_heatmaps(list(attention), num_patches=15)
    with pytest.raises(ValueError, match="not the 9 patches"):
        patch_heatmaps(list(attention), num_patches=9)


def test_memory_usage_splits_prototype_columns():
    seq_len, prototypes = 4, 3
    attention = torch.rand(2, 1, 2, seq_len, seq_len + prototypes).softmax(-1)  # (L, B, heads, T, S + m)
    mass, per_prototype = memory_usage(list(attention), seq_len)
    assert mass.shape == (2,) and per_prototype.shape == (2, prototypes)
    expected = attention[:, 0, :, :, seq_len:].mean(dim=(1, 2))  # (L, m)
    np.testing.assert_allclose(per_prototype, expected.numpy(), rtol=1e-6)
    np.testing.assert_allclose(mass, per_prototype.sum(-1), rtol=1e-6)
    no_memory = torch.rand(2, 1, 2, seq_len, seq_len).softmax(-1)
    mass, per_prototype = memory_usage(list(no_memory), seq_len)
    assert per_prototype.shape == (2, 0) and (mass == 0).all()


def test_token_texts_strip_the_bpe_marker(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["red</w>", "circl", "e</w>"])
    assert token_texts(tokenizer, ids) == ["red", "circl", "e"]


def test_model_view_inverts_the_processor(tokenizer):
    model = tiny_model(vocab_size=len(tokenizer))
    processor = FsgrPmaProcessor.for_config(model.config, tokenizer)
    image = _image(model.config.image_size)  # already the tower's size: resize and crop change nothing
    pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    view = model_view(pixel_values, processor.image_processor.image_mean, processor.image_processor.image_std)
    assert view.shape == (32, 32, 3) and view.dtype == np.uint8
    assert np.abs(view.astype(int) - np.asarray(image, dtype=int)).max() <= 1


def test_concept_legend_counts_most_frequent_first():
    concept_map = np.array([[3, 3], [1, 3]])
    names = [f"c{i}" for i in range(5)]
    assert concept_legend(concept_map, names) == [(3, "c3", 3), (1, "c1", 1)]


# ----------------------------------------------------------------------------------------------------------------
# explain_image on a tiny model
def test_explanation_heatmaps_are_patch_distributions(tokenizer):
    explanation, model = _explain(tokenizer)
    config = model.config
    count = len(explanation.tokens)
    assert MIN_WORDS <= count <= 6 and explanation.token_ids.shape == (count,)
    assert explanation.heatmaps.shape == (count, config.grid_size, config.grid_size)
    assert (explanation.heatmaps >= 0).all()
    np.testing.assert_allclose(explanation.heatmaps.sum((1, 2)), 1.0, atol=1e-5)
    assert explanation.image.shape == (config.image_size, config.image_size, 3)
    # The words are the greedy caption, without BOS/EOS.
    processor = FsgrPmaProcessor.for_config(config, tokenizer)
    with torch.inference_mode():
        pixel_values = processor(images=[_image(config.image_size)], return_tensors="pt")["pixel_values"]
        greedy = model.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=6)[0, 1:]
    greedy = greedy[greedy != config.eos_token_id]
    assert explanation.token_ids.tolist() == greedy.tolist()
    assert explanation.caption == processor.batch_decode(greedy[None], skip_special_tokens=True)[0].strip()


def test_heatmap_t_is_the_row_that_predicted_token_t(tokenizer):
    explanation, model = _explain(tokenizer)
    processor = FsgrPmaProcessor.for_config(model.config, tokenizer)
    inputs = torch.tensor([[model.config.bos_token_id, *explanation.token_ids[:-1].tolist()]])  # (1, T)
    with torch.inference_mode():
        pixel_values = processor(images=[_image(model.config.image_size)], return_tensors="pt")["pixel_values"]
        output = forward_with_attentions(model, pixel_values=pixel_values, input_ids=inputs, use_cache=False)
    rows = torch.stack(output.cross_attentions)[:, 0].mean(dim=(0, 1))  # (T, n_tokens), mean over layers, heads
    np.testing.assert_allclose(explanation.heatmaps.reshape(len(inputs[0]), -1), rows.numpy(), atol=1e-6)


def test_concept_map_is_the_encoders_assignment(tokenizer):
    explanation, model = _explain(tokenizer)
    config = model.config
    assert explanation.concept_map.shape == (config.grid_size, config.grid_size)
    assert ((explanation.concept_map >= 0) & (explanation.concept_map < config.num_concepts)).all()
    processor = FsgrPmaProcessor.for_config(config, tokenizer)
    with torch.inference_mode():
        pixel_values = processor(images=[_image(config.image_size)], return_tensors="pt")["pixel_values"]
        encoded = model.encoder(pixel_values=pixel_values)
    np.testing.assert_array_equal(explanation.concept_map.ravel(), encoded.patch_concepts[0].numpy())
    assert set(explanation.concept_map.ravel()) <= set(encoded.selected_concepts[0].tolist())
    assert explanation.concept_names == [f"concept {row}" for row in range(config.num_concepts)]
    assert explanation.concepts_used


def test_concept_names_come_from_the_config(tokenizer):
    names = [f"thing{i}" for i in range(12)]
    explanation, _ = _explain(tokenizer, concept_names=names)
    assert explanation.concept_names == names


def test_no_fsgr_keeps_the_map_but_marks_it_unused(tokenizer):
    explanation, _ = _explain(tokenizer, use_fsgr=False)
    assert explanation.concept_map is not None and not explanation.concepts_used


@pytest.mark.parametrize(
    "memory,status", [("off", MEMORY_OFF), ("empty", MEMORY_NOT_REFRESHED), ("refreshed", MEMORY_ACTIVE)]
)
def test_memory_mass_by_memory_state(tokenizer, memory, status):
    explanation, model = _explain(tokenizer, memory)
    layers = model.config.num_hidden_layers
    assert explanation.memory_status == status
    assert explanation.memory_mass.shape == (layers,)
    if status == MEMORY_ACTIVE:
        assert explanation.prototype_mass.shape == (layers, model.config.num_prototypes)
        assert ((explanation.memory_mass > 0) & (explanation.memory_mass < 1)).all()
        assert (explanation.prototype_mass >= 0).all()
        np.testing.assert_allclose(explanation.prototype_mass.sum(-1), explanation.memory_mass, rtol=1e-5)
    else:
        assert explanation.prototype_mass.shape == (layers, 0)
        assert (explanation.memory_mass == 0).all()


def test_explain_refuses_training_mode(tokenizer):
    model = _model(tokenizer).train()
    processor = FsgrPmaProcessor.for_config(model.config, tokenizer)
    with pytest.raises(ValueError, match="eval"):
        explain_image(model, processor, _image())


# ----------------------------------------------------------------------------------------------------------------
# The figure
def _assert_png(path, min_width: int = 800, min_height: int = 400) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # a truncated file fails here
        width, height = image.size
    assert width >= min_width and height >= min_height and width < 4000 and height < 4000


@pytest.mark.parametrize("memory", ["off", "empty", "refreshed"])
def test_plot_writes_a_png(tokenizer, tmp_path, memory):
    explanation, _ = _explain(tokenizer, memory, use_fsgr=memory != "empty")
    path = plot_explanation(explanation, tmp_path / "sub" / "figure.png")
    assert path == tmp_path / "sub" / "figure.png"
    _assert_png(path)


@pytest.mark.parametrize("words", [0, 20], ids=["no-words", "more-than-shown"])
def test_plot_edge_cases(tmp_path, words):
    rng = np.random.default_rng(0)
    heatmaps = rng.dirichlet(np.ones(16), size=words).reshape(words, 4, 4)  # (T, 4, 4)
    explanation = Explanation(
        caption="", tokens=[f"w{i}" for i in range(words)], token_ids=np.arange(words), image=np.zeros((32, 32, 3),
        np.uint8), heatmaps=heatmaps.astype(np.float32), concept_map=None, concept_names=[], concepts_used=True,
        memory_status=MEMORY_ACTIVE, memory_mass=np.array([0.3, 0.5]), prototype_mass=np.full((2, 40), 0.01),
    )
    _assert_png(plot_explanation(explanation, tmp_path / "edge.png"))


# ----------------------------------------------------------------------------------------------------------------
# fsgr-pma explain
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("model")
    model = _model(tokenizer, "refreshed")
    model.save_pretrained(directory)
    FsgrPmaProcessor.for_config(model.config, tokenizer).save_pretrained(directory)
    return directory


def _one_line_error(capsys, *needles) -> None:
    """stderr holds exactly one error line (transformers' weight-loading bar may precede it), no traceback."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("fsgr-pma: error: ")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert captured.out == ""
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_explain_writes_the_figure(model_dir, tmp_path, capsys):
    image_path = tmp_path / "photo.jpg"
    _image(48).save(image_path)  # not the tower's size: the processor resizes
    output = tmp_path / "out" / "explain.png"
    assert main(["explain", str(image_path), "--model", str(model_dir), "--output", str(output),
                 "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    caption, written = captured.out.splitlines()
    assert caption.strip() and written == f"wrote {output}"
    assert "Traceback" not in captured.err
    _assert_png(output)


def test_cli_explain_bad_image_exits_1(model_dir, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_text("not a picture")
    output = tmp_path / "never.png"
    assert main(["explain", str(bad), "--model", str(model_dir), "--output", str(output)]) == 1
    _one_line_error(capsys, str(bad), "not an image")
    assert not output.exists()


def test_cli_explain_missing_model_exits_2(tmp_path, capsys):
    image_path = tmp_path / "photo.png"
    _image().save(image_path)
    missing = tmp_path / "no_such_model"
    assert main(["explain", str(image_path), "--model", str(missing), "--output", str(tmp_path / "x.png")]) == 2
    _one_line_error(capsys, "not found", str(missing))


def test_cli_explain_output_must_be_png(model_dir, tmp_path, capsys):
    image_path = tmp_path / "photo.png"
    _image().save(image_path)
    assert main(["explain", str(image_path), "--model", str(model_dir), "--output", str(tmp_path / "x.jpg")]) == 2
    _one_line_error(capsys, ".png")


@pytest.mark.parametrize("argv", [["explain"], ["explain", "a.png", "--model", "m"], ["explain", "a.png"]])
def test_cli_explain_usage_errors_exit_2(argv):
    assert main(argv) == 2


def test_cli_explain_too_many_tokens_exits_2(model_dir, tmp_path, capsys):
    image_path = tmp_path / "photo.png"
    _image().save(image_path)
    argv = ["explain", str(image_path), "--model", str(model_dir), "--output", str(tmp_path / "x.png")]
    assert main(argv + ["--max-new-tokens", "25"]) == 2  # tiny_config: max_position_embeddings 24
    _one_line_error(capsys, "--max-new-tokens 25", "24")
