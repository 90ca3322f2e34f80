"""`fsgr-pma caption`: odd image modes, EXIF orientation, bad files, JSON output, exit codes, model errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model
from PIL import Image

from modeling_fsgr_pma.cli.main import load_image, main
from modeling_fsgr_pma.cli.loading import PROCESSOR_FILES
from modeling_fsgr_pma.data.captions import BadImageError
from modeling_fsgr_pma.processing_fsgr_pma import FsgrPmaProcessor
from modeling_fsgr_pma.data.tokenization import train_caption_tokenizer

REPO = Path(__file__).resolve().parents[1]
MAX_PIXELS = 5000  # every good image below is 40×30 = 1200 pixels
FAST = ["--num-beams", "1", "--max-new-tokens", "4"]


def _mode_image(mode: str) -> Image.Image:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype("<u2"))
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


# (file name, mode): the format follows the extension; CMYK is stored as JPEG, the rest losslessly.
GOOD_IMAGES = [
    ("mode_cmyk.jpg", "CMYK"),
    ("mode_i16.png", "I;16"),
    ("mode_l.png", "L"),
    ("mode_la.png", "LA"),
    ("mode_p.gif", "P"),
    ("mode_rgb.bmp", "RGB"),
    ("mode_rgba.webp", "RGBA"),
    ("mode_rgba_tiff.tiff", "RGBA"),
]


def _write_good(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, mode in GOOD_IMAGES:
        _mode_image(mode).save(folder / name)
        paths.append(folder / name)
    # 40 wide × 30 high as stored, tagged "rotate 90° clockwise to display" (orientation 6) → 30 × 40 upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    _mode_image("RGB").save(folder / "exif_rotated.jpg", exif=exif)
    paths.append(folder / "exif_rotated.jpg")
    return paths


def _write_bad(folder: Path) -> dict[str, str]:
    """Bad files inside `folder`; maps each name to a word its error message must contain."""
    (folder / "zero_bytes.png").write_bytes(b"")
    buffer = folder / "whole.tmp"
    _mode_image("RGB").save(buffer, format="PNG")
    (folder / "truncated.png").write_bytes(buffer.read_bytes()[:120])
    buffer.unlink()
    (folder / "text_renamed.png").write_text("this is not a picture\n")
    Image.new("RGB", (100, 100), "blue").save(folder / "too_large.png")  # 10 000 > MAX_PIXELS
    (folder / "notes.txt").write_text("not an image extension: directories skip it\n")
    return {"zero_bytes.png": "zero-byte", "truncated.png": "truncated", "text_renamed.png": "not an image",
            "too_large.png": "exceeds the limit"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    tokenizer = train_caption_tokenizer(["a red circle", "two blue squares"] * 5, vocab_size=64)
    model = tiny_model(vocab_size=len(tokenizer))
    # An untrained model tends to repeat <bos>; keep special tokens out so captions are non-empty words.
    special = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id]
    model.generation_config.suppress_tokens = special
    model.generation_config.min_new_tokens = 2
    model.save_pretrained(directory)
    FsgrPmaProcessor.for_config(model.config, tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    _write_good(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Image loading (no model)
@pytest.mark.parametrize("name,mode", GOOD_IMAGES, ids=[mode for _, mode in GOOD_IMAGES])
def test_load_image_odd_modes(good_dir, name, mode):
    image = load_image(str(good_dir / name), max_pixels=MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_load_image_applies_exif_orientation(good_dir):
    path = good_dir / "exif_rotated.jpg"
    with Image.open(path) as raw:
        assert raw.size == (40, 30) and raw.getexif()[0x0112] == 6
        expected = np.asarray(raw.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    image = load_image(str(path), max_pixels=MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (30, 40)
    np.testing.assert_array_equal(np.asarray(image), expected)


BAD_NAMES = ["zero_bytes.png", "truncated.png", "text_renamed.png", "too_large.png", "missing.png"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_load_image_bad_files(tmp_path, name):
    reasons = _write_bad(tmp_path)
    reasons["missing.png"] = "not found"
    with pytest.raises(BadImageError, match=reasons[name]) as info:
        load_image(str(tmp_path / name), max_pixels=MAX_PIXELS)
    assert name in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# End to end
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_caption_mixed_folder(model_dir, tmp_path, capsys, as_json):
    folder = tmp_path / "images"
    _write_good(folder)
    reasons = _write_bad(folder)
    missing = tmp_path / "does_not_exist.jpg"
    reasons[missing.name] = "not found"
    args = ["caption", "--model", str(model_dir), str(folder), str(missing), "--max-pixels", str(MAX_PIXELS)]
    args += FAST + ["--batch-size", "3"] + (["--json"] if as_json else [])

    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "captioning" in err  # 9 good images in batches of 3: a progress bar on stderr

    expected = [str(folder / name) for name in sorted(n for n in os.listdir(folder) if not n.endswith(".txt"))]
    expected.append(str(missing))
    lines = out.splitlines()
    assert len(lines) == len(expected) == len(GOOD_IMAGES) + 1 + len(reasons)
    for line, path in zip(lines, expected):
        name = Path(path).name
        if as_json:
            record = json.loads(line)
            assert record["file"] == path
            text, is_error = (record["error"], True) if "error" in record else (record["caption"], False)
            assert set(record) == {"file", "error" if is_error else "caption"}
        else:
            file, _, text = line.partition("\t")
            assert file == path
            is_error = text.startswith("ERROR: ")
        if name in reasons:
            assert is_error and reasons[name] in text, line
        else:
            assert not is_error and text.strip(), line


def test_caption_all_good_exit_zero(model_dir, good_dir, capsys):
    files = [str(good_dir / name) for name, _ in GOOD_IMAGES[:3]]
    assert main(["caption", "--model", str(model_dir), *files, *FAST, "--num-beams", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == files
    assert all(line.split("\t")[1] and "ERROR" not in line for line in lines)


def _assert_one_line_error(capsys, *needles):
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_model_dir_exits_2(tmp_path, good_dir, capsys):
    missing = tmp_path / "no_such_model"
    assert main(["caption", "--model", str(missing), str(good_dir)]) == 2
    _assert_one_line_error(capsys, "not found", str(missing))


@pytest.mark.parametrize(
    "removed", [PROCESSOR_FILES, (*PROCESSOR_FILES, "tokenizer_config.json")], ids=["processor-files", "all-tokenizer"]
)
def test_model_without_processor_exits_2(model_dir, tmp_path, good_dir, capsys, removed):
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    for name in removed:
        (bare / name).unlink(missing_ok=True)
    assert main(["caption", "--model", str(bare), str(good_dir)]) == 2
    _assert_one_line_error(capsys, *PROCESSOR_FILES, "processor.save_pretrained")


USAGE_ERRORS = [[], ["caption"], ["caption", "--model", "x"], ["caption", "--model", "x", "a.png", "--batch-size", "0"]]


@pytest.mark.parametrize("argv", USAGE_ERRORS)
def test_usage_errors_exit_2(argv):
    assert main(argv) == 2


@pytest.fixture(scope="module", autouse=True)
def dash_m(model_dir, good_dir):
    """`python -m modeling_fsgr_pma.cli.main`, started before the other tests so its interpreter start-up overlaps them."""
    files = [str(good_dir / "mode_l.png"), str(good_dir / "missing.png")]
    command = [sys.executable, "-m", "modeling_fsgr_pma.cli.main", "caption", "--model", str(model_dir), *files, *FAST]
    process = subprocess.Popen(
        command + ["--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    yield process, files
    if process.poll() is None:
        process.kill()
        process.communicate()


def test_python_dash_m(dash_m):
    process, files = dash_m
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [r["file"] for r in records] == files
    assert records[0]["caption"] and "not found" in records[1]["error"]


def test_max_new_tokens_beyond_the_model_exits_2(model_dir, good_dir, capsys):
    # tiny_config: max_position_embeddings 24, which an untrained model would run into
    assert main(["caption", "--model", str(model_dir), str(good_dir), "--max-new-tokens", "25"]) == 2
    captured = capsys.readouterr()  # the model loaded (transformers' progress bar is on stderr too), nothing captioned
    assert captured.out == "" and "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("fsgr-pma: error:")]
    assert errors == ["fsgr-pma: error: --max-new-tokens 25 exceeds this model's limit of 24 tokens"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_unavailable_exits_2(model_dir, good_dir, capsys):
    assert main(["caption", "--model", str(model_dir), str(good_dir), "--device", "cuda"]) == 2
    _assert_one_line_error(capsys, "CUDA is not available")


def test_unknown_hub_repo_exits_2_offline(good_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "modeling_fsgr_pma.cli.main", "caption", "--model", "nobody-here/no-such-model",
               str(good_dir / "mode_l.png")]
    process = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    assert "could not load the model from nobody-here/no-such-model" in process.stderr
