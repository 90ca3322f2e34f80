"""The caption loader: five layouts through one code path, every kind of bad image, and the validation cache."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

import modeling_fsgr_pma.data.captions as data_module
from modeling_fsgr_pma.data.captions import BadImageError, decode_image, load_caption_split, to_rgb
from modeling_fsgr_pma.data.synthetic import generate_coco_world, generate_world


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def rgb(size: int = 24, colour: tuple[int, int, int] = (200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def png_with_size(width: int, height: int) -> bytes:
    """A 1×1 PNG whose header claims `width × height`: PIL's size check fires before any pixel is read."""
    data = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    header = struct.pack(">I", 13) + data + struct.pack(">I", zlib.crc32(data))
    small = encode(rgb(1))
    return small[:8] + header + small[33:]


def corrupt_png() -> bytes:
    data = bytearray(encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8))))
    data[60:90] = bytes(30)
    return bytes(data)


# Image kinds that are converted to RGB: (file name, bytes, mode PIL opens).
CONVERTED = {
    "grayscale": ("gray.png", lambda: encode(rgb().convert("L")), "L"),
    "gray_alpha": ("la.png", lambda: encode(rgb().convert("LA")), "LA"),
    "rgba": ("rgba.png", lambda: encode(rgb().convert("RGBA")), "RGBA"),
    "palette": ("palette.png", lambda: encode(rgb().convert("P")), "P"),
    "palette_transparent": ("ptrans.png", lambda: encode(rgb().convert("P"), transparency=0), "P"),
    "16bit": ("deep.png", lambda: encode(Image.fromarray(np.full((24, 24), 40000, dtype=np.uint16))), "I;16"),
    "cmyk": ("cmyk.jpg", lambda: encode(rgb().convert("CMYK"), "JPEG"), "CMYK"),
    "bilevel": ("bilevel.png", lambda: encode(rgb().convert("1")), "1"),
}
# Image kinds that are skipped: (file name, bytes, reason in the message, max_pixels).
SKIPPED = {
    "zero_byte": ("empty.png", lambda: b"", "zero-byte", None),
    "not_an_image": ("notes.jpg", lambda: b"these are not pixels\n" * 20, "not an image", None),
    "truncated": ("truncated.png", lambda: encode(rgb(64))[:60], "truncated", None),
    "truncated_jpeg": ("truncated.jpg", lambda: encode(rgb(64), "JPEG")[:200], "truncated", None),
    "corrupt": ("corrupt.png", corrupt_png, "truncated or corrupt", None),
    "decompression_bomb": ("bomb.png", lambda: png_with_size(20_000, 20_000), "too large", None),
    "bomb_warning_zone": ("big.png", lambda: png_with_size(12_000, 12_000), "too large", None),
    "over_max_pixels": ("wide.png", lambda: encode(rgb(100)), "exceeds the limit", 5_000),
}


def write_folder(directory: Path, files: dict[str, bytes], captions: dict | list | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    if captions is None:
        captions = {name: [f"a picture called {name}", "a square"] for name in files}
    (directory / "captions.json").write_text(json.dumps(captions))
    return directory


# ----------------------------------------------------------------------------------------------------------------
# Layouts
def test_synthetic_parquet_layout(tmp_path):
    generate_world(tmp_path, 4, seed=0)
    data = load_caption_split(tmp_path, "train")
    assert data.column_names == ["image_id", "image", "captions", "objects", "background"]
    assert len(data) == 4
    row = data[0]
    assert row["image"].mode == "RGB" and row["image"].size == (64, 64)
    assert row["image_id"].startswith("synthetic-train-") and len(row["captions"]) >= 5
    assert {"shape", "colour", "size"} <= set(row["objects"][0])
    assert len(load_caption_split(tmp_path, "test_novel")) == 1


def test_hub_parquet_without_ids_gets_ids_and_drops_extra_columns(tmp_path):
    table = pa.table(
        {
            "image": [{"bytes": encode(rgb()), "path": None}, {"bytes": encode(rgb().convert("L")), "path": None}],
            "captions": [["a red square"], ["a grey square"]],
            "license": ["cc", "cc"],
        }
    )
    pq.write_table(table, tmp_path / "validation-00000-of-00001.parquet")
    data = load_caption_split(tmp_path, "validation")
    assert data.column_names == ["image_id", "image", "captions"]
    assert data["image_id"][:] == ["validation-0", "validation-1"]
    assert [image.mode for image in data["image"]] == ["RGB", "RGB"]


def write_karpathy(tmp_path: Path, bad: bytes | None = None) -> tuple[Path, Path]:
    """Two val2014 images (the second one `bad` when given) and a `val` Parquet file in the Hub's layout."""
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    names = ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000073.jpg"]
    (root / "val2014" / names[0]).write_bytes(encode(rgb(32), "JPEG"))
    (root / "val2014" / names[1]).write_bytes(bad if bad is not None else encode(rgb(40), "JPEG"))
    table = pa.table(
        {
            "filepath": ["val2014", "val2014"],
            "filename": names,
            "cocoid": [42, 73],
            "sentences": [["a man riding a horse", "a horse and a rider"], ["a cat on a sofa"]],
            "url": ["http://a", "http://b"],
        }
    )
    dataset_dir = tmp_path / "karpathy"
    (dataset_dir / "data").mkdir(parents=True)
    pq.write_table(table, dataset_dir / "data" / "val-00000-of-00001.parquet")
    return dataset_dir, root


def test_karpathy_layout(tmp_path):
    dataset_dir, root = write_karpathy(tmp_path)
    data = load_caption_split(dataset_dir, "validation", image_root=root)
    assert data["image_id"][:] == ["42", "73"]
    assert data["captions"][0] == ["a man riding a horse", "a horse and a rider"]
    assert data[1]["image"].size == (40, 40) and data[1]["image"].mode == "RGB"
    with pytest.raises(ValueError, match="image_root"):
        load_caption_split(dataset_dir, "validation")
    with pytest.raises(ValueError, match="No split 'test'"):
        load_caption_split(dataset_dir, "test", image_root=root)


def test_karpathy_bad_image_names_the_file(tmp_path, caplog):
    dataset_dir, root = write_karpathy(tmp_path, bad=b"")
    caplog.set_level(logging.WARNING, logger="modeling_fsgr_pma.data.captions")
    assert load_caption_split(dataset_dir, "validation", image_root=root)["image_id"][:] == ["42"]
    assert re.search(r"COCO_val2014_000000000073\.jpg.*row 73.*zero-byte", caplog.text)


def test_folder_without_splits_is_the_requested_split(tmp_path):
    folder = write_folder(tmp_path, {"a.jpg": encode(rgb(), "JPEG"), "b.png": encode(rgb())})
    for split in ("train", "test"):
        data = load_caption_split(folder, split)
        assert sorted(data["image_id"]) == ["a", "b"]
        assert data[0]["captions"][1] == "a square"


def test_folder_records_with_splits(tmp_path):
    records = [
        {"file_name": "a.png", "captions": ["one"], "split": "train"},
        {"image": "b.png", "captions": ["two"], "split": "val", "image_id": "bee"},
        {"file_name": "c.png", "captions": ["three"], "split": "train"},
    ]
    folder = write_folder(tmp_path, {name: encode(rgb()) for name in ("a.png", "b.png", "c.png")}, records)
    assert load_caption_split(folder, "train")["image_id"][:] == ["a", "c"]
    assert load_caption_split(folder, "validation")["image_id"][:] == ["bee"]
    with pytest.raises(ValueError, match="empty"):
        load_caption_split(folder, "test")


def test_folder_mixing_records_with_and_without_split_is_an_error(tmp_path):
    records = [
        {"file_name": "a.png", "captions": ["one"], "split": "train"},
        {"file_name": "b.png", "captions": ["two"]},
    ]
    folder = write_folder(tmp_path, {"a.png": encode(rgb()), "b.png": encode(rgb())}, records)
    with pytest.raises(ValueError, match="1 of 2 records name a split"):
        load_caption_split(folder, "train")


def test_unknown_layout_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_caption_split(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="No split"):
        load_caption_split(tmp_path, "train")
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "train-00000-of-00001.parquet")
    with pytest.raises(ValueError, match="Unrecognised Parquet columns"):
        load_caption_split(tmp_path, "train")


# ----------------------------------------------------------------------------------------------------------------
# Captions
@pytest.mark.parametrize("captions", [[], [""], ["a square", "   "]], ids=["none", "empty", "blank"])
def test_missing_or_empty_captions_name_the_row(tmp_path, captions):
    records = [
        {"file_name": "good.png", "captions": ["a square"]},
        {"file_name": "bad.png", "captions": captions, "image_id": "row-17"},
    ]
    folder = write_folder(tmp_path, {"good.png": encode(rgb()), "bad.png": encode(rgb())}, records)
    with pytest.raises(ValueError, match="row-17"):
        load_caption_split(folder, "train")


# ----------------------------------------------------------------------------------------------------------------
# Bad images
@pytest.mark.parametrize("kind", sorted(CONVERTED))
def test_odd_modes_are_converted_to_rgb(tmp_path, kind, caplog):
    name, make, mode = CONVERTED[kind]
    data = make()
    assert Image.open(io.BytesIO(data)).mode == mode
    assert decode_image(data).mode == "RGB"
    folder = write_folder(tmp_path, {"good.png": encode(rgb()), name: data})
    caplog.set_level(logging.INFO, logger="modeling_fsgr_pma.data.captions")
    loaded = load_caption_split(folder, "train")
    assert len(loaded) == 2
    assert all(image.mode == "RGB" and image.size == (24, 24) for image in loaded["image"])
    assert "converted 1 of 2 images to RGB" in caplog.text


@pytest.mark.parametrize("kind", sorted(SKIPPED))
def test_bad_images_are_skipped_and_counted(tmp_path, kind, caplog):
    name, make, reason, max_pixels = SKIPPED[kind]
    folder = write_folder(tmp_path, {"good.png": encode(rgb()), name: make()})
    caplog.set_level(logging.INFO, logger="modeling_fsgr_pma.data.captions")
    loaded = load_caption_split(folder, "train", max_pixels=max_pixels)
    assert loaded["image_id"][:] == ["good"]
    assert name in caplog.text and reason in caplog.text
    assert "skipped 1 of 2 images" in caplog.text


@pytest.mark.parametrize("kind", sorted(SKIPPED))
def test_decode_image_raises_for_bad_images(tmp_path, kind):
    name, make, reason, max_pixels = SKIPPED[kind]
    folder = write_folder(tmp_path, {name: make()})
    with pytest.raises(BadImageError, match=reason) as error:
        decode_image(folder / name, name=name, max_pixels=max_pixels)
    assert name in str(error.value)


def test_missing_file_and_embedded_bad_image_name_the_row(tmp_path, caplog):
    folder = write_folder(tmp_path / "folder", {"good.png": encode(rgb())}, {"good.png": ["a"], "gone.png": ["b"]})
    caplog.set_level(logging.WARNING, logger="modeling_fsgr_pma.data.captions")
    assert load_caption_split(folder, "train")["image_id"][:] == ["good"]
    assert re.search("gone.png.*file not found", caplog.text)
    table = pa.table(
        {
            "image_id": ["ok", "broken"],
            "image": [{"bytes": encode(rgb()), "path": None}, {"bytes": b"\x89PNG nonsense", "path": None}],
            "captions": [["a"], ["b"]],
        }
    )
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    caplog.clear()
    assert load_caption_split(tmp_path / "hub", "train")["image_id"][:] == ["ok"]
    assert re.search(r"row broken\): not an image", caplog.text) and "skipped 1 of 2 images" in caplog.text


def test_to_rgb_conversions():
    deep = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(deep))[0, :, 0].tolist() == [0, 255]
    transparent = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert np.asarray(to_rgb(transparent)).min() == 255  # composited on white, not black
    image = rgb()
    assert to_rgb(image) is image
    with pytest.raises(BadImageError, match="x: no image data"):
        decode_image({"bytes": None, "path": None}, name="x")


# ----------------------------------------------------------------------------------------------------------------
# COCO as users have it: Karpathy's dataset_coco.json and COCO-format image info (nocaps, the test server)
@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """The COCO-shaped synthetic world: 7 train + 3 restval, 2 val, 2 test, 2 test2014, 2 + 2 nocaps images."""
    directory = tmp_path_factory.mktemp("coco")
    generate_coco_world(directory, num_images=10, seed=0, image_size=32, num_workers=1)
    return directory


def test_karpathy_json_splits(coco, tmp_path):
    cache = tmp_path / "cache"
    train = load_caption_split(coco / "dataset_coco.json", "train", image_root=coco, cache_dir=cache)
    assert len(train) == 10 and train["image_id"][:3] == ["1", "2", "3"]  # cocoids; restval folded in
    assert train[0]["image"].size == (43, 32) and train[0]["image"].mode == "RGB"
    assert len(train[0]["captions"]) >= 5
    only_train = load_caption_split(coco, "train", image_root=coco, fold_restval=False, cache_dir=cache)
    assert len(only_train) == 7  # the directory holding dataset_coco.json works as well
    assert load_caption_split(coco, "validation", image_root=coco, cache_dir=cache)["image_id"][:] == ["11", "12"]
    assert len(load_caption_split(coco, "restval", image_root=coco, cache_dir=cache)) == 3
    with pytest.raises(ValueError, match=r"No split 'test_novel'.*\['restval', 'test', 'train', 'val'\]"):
        load_caption_split(coco, "test_novel", image_root=coco, cache_dir=cache)
    with pytest.raises(ValueError, match="image_root"):
        load_caption_split(coco, "test", cache_dir=cache)
    with pytest.raises(ValueError, match=r"None of the 2 images exists, e\.g\. .*val2014.*--image-root"):
        load_caption_split(coco, "test", image_root=coco / "nocaps", cache_dir=cache)


def test_coco_format_image_info(coco, tmp_path):
    cache = tmp_path / "cache"
    nocaps = coco / "nocaps"
    validation = load_caption_split(
        nocaps / "nocaps_val_4500_captions.json", "validation", image_root=nocaps / "validation", cache_dir=cache
    )
    assert validation.column_names == ["image_id", "image", "captions", "domain"]
    assert validation["image_id"][:] == ["0", "1"] and validation["domain"][:] == ["in-domain", "out-domain"]
    assert len(validation[0]["captions"]) >= 5
    test_file = nocaps / "nocaps_test_image_info.json"
    with pytest.raises(ValueError, match="Row '0' has no captions"):
        load_caption_split(test_file, "test", image_root=nocaps / "test", cache_dir=cache)
    test = load_caption_split(test_file, "test", image_root=nocaps / "test", require_captions=False, cache_dir=cache)
    assert len(test) == 2 and test["captions"][:] == [[], []]
    server = load_caption_split(
        coco / "annotations" / "image_info_test2014.json", "test", image_root=coco / "test2014",
        require_captions=False, cache_dir=cache,
    )  # fmt: skip
    assert server["image_id"][:] == ["15", "16"] and server[1]["image"].mode == "RGB"


def test_bad_json_inputs_are_clear_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a dataset directory nor a JSON file"):
        load_caption_split(tmp_path / "notes.txt", "train")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_caption_split(tmp_path / "broken.json", "train", image_root=tmp_path)
    (tmp_path / "other.json").write_text(json.dumps({"images": [{"url": "x"}]}))
    with pytest.raises(ValueError, match="neither Karpathy's"):
        load_caption_split(tmp_path / "other.json", "train", image_root=tmp_path)
    orphan = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 9, "caption": "x"}]}
    (tmp_path / "orphan.json").write_text(json.dumps(orphan))
    with pytest.raises(ValueError, match="annotations name images not in `images`, e.g. 9"):
        load_caption_split(tmp_path / "orphan.json", "test", image_root=tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Validation once, cached by size and modification time
def count_validations(monkeypatch) -> list[str]:
    """Record the name of every image the loader decodes to validate it."""
    validated = []
    original = data_module._validate

    def recording(item, max_pixels):
        validated.append(item[1])
        return original(item, max_pixels)

    monkeypatch.setattr(data_module, "_validate", recording)
    return validated


def test_second_load_validates_nothing_and_a_changed_file_alone(coco, tmp_path, monkeypatch, caplog):
    validated = count_validations(monkeypatch)
    corpus = tmp_path / "corpus"
    shutil.copytree(coco, corpus)
    cache = tmp_path / "cache"
    first = load_caption_split(corpus, "train", image_root=corpus, cache_dir=cache, num_workers=2)
    assert len(validated) == 10
    again = load_caption_split(corpus, "train", image_root=corpus, cache_dir=cache)
    assert len(validated) == 10  # nothing decoded
    assert again["image_id"][:] == first["image_id"][:] and again["captions"][:] == first["captions"][:]
    assert list(again[4]["image"].getdata()) == list(first[4]["image"].getdata())
    changed = corpus / "train2014" / "COCO_train2014_000000000003.jpg"
    changed.write_bytes(encode(rgb(40), "JPEG"))  # other size and time: revalidated, alone
    reloaded = load_caption_split(corpus, "train", image_root=corpus, cache_dir=cache)
    assert validated[10:] == [f"{changed} (row 3)"] and reloaded[2]["image"].size == (40, 40)
    changed.write_bytes(b"")  # now bad: skipped, and named again on the next (cached) load
    assert "3" not in load_caption_split(corpus, "train", image_root=corpus, cache_dir=cache)["image_id"]
    caplog.set_level(logging.WARNING, logger="modeling_fsgr_pma.data.captions")
    caplog.clear()
    assert "3" not in load_caption_split(corpus, "train", image_root=corpus, cache_dir=cache)["image_id"]
    assert re.search(r"COCO_train2014_000000000003\.jpg \(row 3\): zero-byte", caplog.text)
    assert len(validated) == 12


def test_index_holds_paths_not_pixels(coco, tmp_path):
    data = load_caption_split(coco, "train", image_root=coco, cache_dir=tmp_path)
    images = data.data.column("image")
    assert pc.all(pc.is_null(pc.struct_field(images, "bytes"))).as_py()  # decoded when a row is read
    assert data.cache_files and data.cache_files[0]["filename"].startswith(str(tmp_path))  # memory-mapped


def test_parquet_layout_reuses_validation_by_row(tmp_path, monkeypatch):
    validated = count_validations(monkeypatch)
    generate_world(tmp_path / "world", 4, seed=0)
    first = load_caption_split(tmp_path / "world", "train", cache_dir=tmp_path / "cache")
    again = load_caption_split(tmp_path / "world", "train", cache_dir=tmp_path / "cache")
    assert len(validated) == 4 and again["image_id"][:] == first["image_id"][:]
    generate_world(tmp_path / "world", 4, seed=1)  # rewritten Parquet: validated again
    load_caption_split(tmp_path / "world", "train", cache_dir=tmp_path / "cache")
    assert len(validated) == 8


def test_conversions_survive_the_cache(tmp_path):
    files = {"good.png": encode(rgb()), "rgba.png": encode(Image.new("RGBA", (24, 24), (0, 0, 0, 0)))}
    folder = write_folder(tmp_path / "folder", files)
    for _ in range(2):  # built, then from the cache
        loaded = load_caption_split(folder, "train", cache_dir=tmp_path / "cache")
        rows = dict(zip(loaded["image_id"], loaded["image"]))
        assert np.asarray(rows["rgba"]).min() == 255  # to_rgb's white background, not PIL's black
