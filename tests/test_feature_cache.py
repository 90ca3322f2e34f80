"""The sharded feature cache: round trip, resumable writes, reads of the rows asked for, and the errors that guard it."""

from __future__ import annotations

import pickle

import pytest
import torch

from conftest import tiny_config
from modeling_fsgr_pma.data.feature_cache import FeatureCacheWriter, bytes_per_image, load_feature_cache

CONFIG = tiny_config()  # 32 px, patch 8: 16 patches, width 32
IDS = [f"img-{i}" for i in range(7)]


def features(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(count, 1 + CONFIG.num_patches, CONFIG.vision_width, generator=generator)
    labels = torch.randint(0, CONFIG.num_concepts, (count, CONFIG.num_patches), generator=generator)
    return hidden, labels


def write_all(directory, dtype: str = "float16", shard_size: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    writer = FeatureCacheWriter(directory, "train", IDS, shard_size, dtype)
    hidden, labels = features(len(IDS))
    for shard in writer.pending():
        rows = writer.rows(shard)
        writer.write(shard, hidden[rows.start : rows.stop], labels[rows.start : rows.stop])
    return hidden, labels


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip(tmp_path, dtype):
    hidden, labels = write_all(tmp_path, dtype)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "index.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"
    ]  # fmt: skip
    cache = load_feature_cache(tmp_path, "train")
    assert cache.image_ids == IDS and len(cache) == 7
    read_hidden, read_labels = cache.read([6, 0, 4])
    assert read_hidden.dtype == getattr(torch, dtype) and read_labels.dtype == torch.int64
    torch.testing.assert_close(read_labels, labels[[6, 0, 4]])
    torch.testing.assert_close(read_hidden, hidden[[6, 0, 4]].to(read_hidden.dtype))
    error = (read_hidden.float() - hidden[[6, 0, 4]]).abs().max() / hidden.abs().max()
    assert error < (2**-11 if dtype == "float16" else 2**-8)  # one rounding of the mantissa


def test_aligned_columns_follow_the_dataset_rows_and_pickle_as_a_location(tmp_path):
    hidden, labels = write_all(tmp_path)
    columns = load_feature_cache(tmp_path, "train").aligned(["img-5", "img-1", "img-2"])  # a dataset's own order
    torch.testing.assert_close(columns["patch_labels"][torch.tensor([0, 2])], labels[[5, 2]])
    torch.testing.assert_close(columns["vision_hidden_states"][[1]], hidden[[1]].half())
    assert len(pickle.dumps(columns["vision_hidden_states"])) < 1000  # not the tensors
    again = pickle.loads(pickle.dumps(columns["vision_hidden_states"]))
    torch.testing.assert_close(again[[0]], hidden[[5]].half())
    assert columns["patch_labels"][[]].shape == (0, CONFIG.num_patches)
    with pytest.raises(ValueError, match="no features for 1 images, e.g. img-9"):
        load_feature_cache(tmp_path, "train").aligned(["img-1", "img-9"])


def test_a_new_writer_finds_the_finished_shards(tmp_path):
    writer = FeatureCacheWriter(tmp_path, "train", IDS, 3, "float16")
    hidden, labels = features(3)
    finished = writer.write(0, hidden, labels)
    (tmp_path / "train" / "shard-00001.safetensors.123.tmp").write_bytes(b"half a shard")  # a killed write
    resumed = FeatureCacheWriter(tmp_path, "train", IDS, 3, "float16")
    assert resumed.pending() == [1, 2] and finished.is_file()
    assert [path.name for path in resumed.remove_partial()] == ["shard-00001.safetensors.123.tmp"]
    with pytest.raises(ValueError, match=r"incomplete \(2 of 3 shards missing\).*again"):
        load_feature_cache(tmp_path, "train")
    with pytest.raises(ValueError, match="different image_ids"):
        FeatureCacheWriter(tmp_path, "train", IDS[:-1], 3, "float16")
    with pytest.raises(ValueError, match="different dtype"):
        FeatureCacheWriter(tmp_path, "train", IDS, 3, "bfloat16")


def test_write_checks_rows_shapes_and_range(tmp_path):
    writer = FeatureCacheWriter(tmp_path, "train", IDS, 3, "float16")
    hidden, labels = features(3)
    with pytest.raises(ValueError, match="shard 2 holds 1 images"):
        writer.write(2, hidden, labels)
    with pytest.raises(ValueError, match="do not match"):
        writer.write(0, hidden, labels[:, :-1])
    with pytest.raises(ValueError, match="--dtype bfloat16"):
        writer.write(0, hidden * 1e5, labels)  # beyond float16's 65504
    assert writer.pending() == [0, 1, 2]
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_feature_cache(tmp_path, "validation")


def test_bytes_per_image_is_the_shard_payload(tmp_path):
    write_all(tmp_path, shard_size=7)
    shard = tmp_path / "train" / "shard-00000.safetensors"
    header = int.from_bytes(shard.read_bytes()[:8], "little") + 8  # safetensors: length, JSON header, data
    assert shard.stat().st_size - header == 7 * bytes_per_image(CONFIG)
    assert bytes_per_image(CONFIG) == (1 + 16) * 32 * 2 + 16 * 4  # float16 values, int32 labels
