"""The synthetic worlds: the shape world (determinism, splits, held-out pairs, captions, the second domain, the
hallucination metric) and the scene world (its measured properties on small worlds, splits, determinism)."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from modeling_fsgr_pma.data.synthetic import (
    DOMAINS,
    SPLITS,
    coco_split_sizes,
    concept_vocabulary,
    domain_spec,
    patch_objects,
    render_scene,
    sample_scene,
    generate_world,
    hallucination_breakdown,
    hallucination_rate,
    mentioned_objects,
)
from scripts import make_synthetic

NUM_IMAGES = 30


def read_split(world_dir: Path, split: str) -> list[dict]:
    return pq.read_table(world_dir / "data" / f"{split}-00000-of-00001.parquet").to_pylist()


@pytest.fixture(scope="module", params=sorted(DOMAINS))
def world(request, tmp_path_factory) -> tuple[str, Path]:
    """A small world per domain: 30 training images, 3 in each other split."""
    directory = tmp_path_factory.mktemp(request.param)
    generate_world(directory, NUM_IMAGES, seed=0, domain=request.param)
    return request.param, directory


def test_files_and_world_json(world):
    domain, directory = world
    info = json.loads((directory / "world.json").read_text())
    assert info["domain"] == domain and info["seed"] == 0
    assert info["counts"] == {"train": NUM_IMAGES, "validation": 3, "test": 3, "test_novel": 3}
    assert info["held_out_pairs"] == [list(pair) for pair in domain_spec(domain).held_out_pairs()]
    for split, count in info["counts"].items():
        rows = read_split(directory, split)
        assert len(rows) == count
        assert set(rows[0]) == {"image_id", "image", "captions", "objects", "background"}
        assert set(rows[0]["objects"][0]) == {"shape", "colour", "size", "x", "y"}
        assert set(rows[0]["background"]) == {"tone", "texture"}


def test_same_seed_same_files_other_seed_other_images(world, tmp_path):
    domain, directory = world
    generate_world(tmp_path / "again", NUM_IMAGES, seed=0, domain=domain)
    generate_world(tmp_path / "other", NUM_IMAGES, seed=1, domain=domain)
    for split in SPLITS:
        assert read_split(tmp_path / "again", split) == read_split(directory, split)
        original = [row["image"]["bytes"] for row in read_split(directory, split)]
        other = [row["image"]["bytes"] for row in read_split(tmp_path / "other", split)]
        assert not set(original) & set(other)


def test_splits_are_disjoint(world):
    _, directory = world
    ids, images = set(), set()
    for split in SPLITS:
        rows = read_split(directory, split)
        ids |= {row["image_id"] for row in rows}
        images |= {row["image"]["bytes"] for row in rows}
    total = sum(len(read_split(directory, split)) for split in SPLITS)
    assert len(ids) == total and len(images) == total


def test_held_out_pairs_only_in_test_novel(world):
    domain, directory = world
    held_out = set(domain_spec(domain).held_out_pairs())
    for split in SPLITS:
        for row in read_split(directory, split):
            pairs = {(o["colour"], o["shape"]) for o in row["objects"]}
            if split == "test_novel":
                assert pairs & held_out, row["image_id"]
            else:
                assert not pairs & held_out, row["image_id"]


def test_captions_mention_every_object(world):
    domain, directory = world
    for row in read_split(directory, "train"):
        assert 1 <= len(row["objects"]) <= 4
        assert len(set(row["captions"])) >= 5
        present = {(o["colour"], o["shape"]) for o in row["objects"]}
        for caption in row["captions"]:
            assert caption == caption.lower().strip() and not caption.endswith(".")
            assert {m for m in mentioned_objects(caption, domain) if m[0]} == present, caption


def test_object_centres_and_patch_owners_match_the_pixels():
    """An object's stored centre lies on its colour, and the patches `patch_objects` gives it show that colour."""
    spec = domain_spec("synthetic")
    rng = np.random.default_rng(3)
    scene = sample_scene(spec, rng, must_include=None, exclude=set())
    pixels = np.asarray(render_scene(scene, spec, 64, rng)).astype(int)  # (64, 64, 3)
    owners = patch_objects(scene["objects"], image_size=64, grid_size=8)
    for index, obj in enumerate(scene["objects"]):
        colour = np.array(spec.colours[obj["colour"]])
        if obj["shape"] != "ring":  # a ring's centre is a hole
            assert np.abs(pixels[int(obj["y"] * 64), int(obj["x"] * 64)] - colour).max() < 40
        patches = np.flatnonzero(owners == index)
        assert len(patches) >= 1
        for patch in patches:
            row, column = divmod(int(patch), 8)
            block = pixels[row * 8 : row * 8 + 8, column * 8 : column * 8 + 8].reshape(-1, 3)
            assert (np.abs(block - colour).max(1) < 40).mean() >= 0.15  # 0.25 of the mask, less its anti-aliased rim
    assert (owners == -1).any()


def test_concepts_name_every_colour_shape_pair_and_background():
    spec = domain_spec("synthetic")
    names = concept_vocabulary("synthetic")
    assert len(names) == len(spec.colours) * len(spec.shapes) + len(spec.tones) == len(set(names))
    assert "purple star" in names and "grey background" in names  # held-out pairs are concepts too
    assert all(len(name.split(" ")) == 2 for name in names)


def test_images_are_rgb_at_the_requested_size(tmp_path):
    generate_world(tmp_path, 2, seed=0, image_size=32)
    image = Image.open(BytesIO(read_split(tmp_path, "train")[0]["image"]["bytes"]))
    assert image.mode == "RGB" and image.size == (32, 32)


def test_split_fractions(tmp_path):
    fractions = {"validation": 0.5, "test": 0.2, "test_novel": 0.01}
    world = generate_world(tmp_path, 10, seed=0, split_fractions=fractions)
    assert world["counts"] == {"train": 10, "validation": 5, "test": 2, "test_novel": 1}
    with pytest.raises(ValueError, match="split_fractions"):
        generate_world(tmp_path, 10, seed=0, split_fractions={"validation": 0.5})


def test_domains_have_disjoint_vocabularies():
    a, b = DOMAINS["synthetic"], DOMAINS["synthetic-b"]
    assert not set(a.shapes) & set(b.shapes)
    assert not set(a.colours) & set(b.colours)
    assert not set(a.textures) & set(b.textures)
    words_b = {word for name in concept_vocabulary("synthetic-b") for word in name.split(" ")}
    assert set(b.shapes) <= words_b
    assert not set(b.shapes) & {word for name in concept_vocabulary("synthetic") for word in name.split(" ")}
    with pytest.raises(ValueError, match="Unknown synthetic domain"):
        domain_spec("synthetic-c")


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a red circle and a blue square", 0.0),
        ("two red circles next to a square that is blue", 0.0),
        ("a green triangle", 1.0),
        ("a red circle and a green square", 0.5),  # the square exists, not in green
        ("a red circle, a star and a blue square", 1 / 3),
        ("a red circle, a red circle and a yellow star", 0.5),  # distinct mentions per caption
        ("an empty picture", None),  # nothing mentioned: no rate, rather than a perfect 0
    ],
)
def test_hallucination_rate(caption, expected):
    red_circle = {"shape": "circle", "colour": "red", "size": "small"}
    blue_square = {"shape": "square", "colour": "blue", "size": "large"}
    objects = {"img": [red_circle, blue_square]}
    rate = hallucination_rate({"img": caption}, objects, "synthetic")
    assert rate == pytest.approx(expected) if expected is not None else rate is None


def test_hallucination_breakdown_names_each_kind_of_mistake():
    objects = {"img": [{"shape": "circle", "colour": "red"}, {"shape": "square", "colour": "blue"}]}
    caption = "a red circle, a red square, a green square, a blue star and a circle"
    result = hallucination_breakdown({"img": caption}, objects, "synthetic")
    assert result["mentions"] == 5  # red circle, red square, green square, blue star, circle
    assert result["hallucination_wrong_binding"] == pytest.approx(1 / 5)  # red square: red and square, apart
    assert result["hallucination_wrong_colour"] == pytest.approx(1 / 5)  # green square: no green object
    assert result["hallucination_wrong_shape"] == pytest.approx(1 / 5)  # blue star: no star
    assert result["hallucination_rate"] == pytest.approx(3 / 5)
    assert hallucination_breakdown({"img": "nothing here"}, objects)["hallucination_wrong_shape"] is None


def test_hallucination_rate_pools_images_and_works_for_the_second_domain():
    objects = {
        "a": [{"shape": "heart", "colour": "pink", "size": "small"}],
        "b": [{"shape": "moon", "colour": "teal", "size": "large"}],
    }
    predictions = {"a": "a pink heart", "b": "a cyan moon and a grey arrow"}
    assert hallucination_rate(predictions, objects, "synthetic-b") == pytest.approx(2 / 3)
    assert hallucination_rate(predictions, objects) == pytest.approx(2 / 3)  # every domain's vocabulary
    assert mentioned_objects("two large grey arrows", "synthetic-b") == {("grey", "arrow")}


def test_make_synthetic_script(tmp_path):
    argv = ["--output-dir", str(tmp_path), "--num-images", "3", "--seed", "2", "--domain", "synthetic-b"]
    world = make_synthetic.main(argv)
    assert world["domain"] == "synthetic-b"
    written = sorted(path.name for path in (tmp_path / "data").iterdir())
    assert written == sorted(f"{split}-00000-of-00001.parquet" for split in SPLITS)
    assert json.loads((tmp_path / "world.json").read_text())["counts"]["train"] == 3
    with pytest.raises(SystemExit):
        make_synthetic.parse_args(["--output-dir", str(tmp_path), "--num-images", "0"])


# ----------------------------------------------------------------------------------------------------------------
# The COCO-shaped world
@pytest.fixture(scope="module")
def coco_world(tmp_path_factory) -> Path:
    """10 Karpathy training images (7 train + 3 restval) and 2 in every evaluation part, short side 48."""
    directory = tmp_path_factory.mktemp("coco_world")
    make_synthetic.main(
        ["--layout", "coco-karpathy", "--domain", "synthetic", "--output-dir", str(directory), "--num-images", "10",
         "--image-size", "48", "--num-workers", "2"]
    )  # fmt: skip
    return directory


def test_coco_world_has_karpathy_json_and_jpeg_folders(coco_world):
    images = json.loads((coco_world / "dataset_coco.json").read_text())["images"]
    assert [image["split"] for image in images] == ["train"] * 7 + ["restval"] * 3 + ["val"] * 2 + ["test"] * 2
    assert len({image["cocoid"] for image in images}) == len(images)
    for image in images:
        assert set(image) >= {"filepath", "filename", "cocoid", "split", "sentences", "imgid", "sentids"}
        assert image["filepath"] == ("train2014" if image["split"] == "train" else "val2014")
        assert image["filename"] == f"COCO_{image['filepath']}_{image['cocoid']:012d}.jpg"
        assert len(image["sentences"]) >= 5 and all(s["raw"] and s["tokens"] for s in image["sentences"])
        picture = Image.open(coco_world / image["filepath"] / image["filename"])
        assert picture.format == "JPEG" and picture.mode == "RGB"
        assert picture.size == ((48, 64) if image["cocoid"] % 4 == 0 else (64, 48))  # 4:3, every fourth portrait


def test_coco_world_test_server_and_nocaps_files(coco_world):
    val2014 = json.loads((coco_world / "annotations" / "captions_val2014.json").read_text())
    assert [image["id"] for image in val2014["images"]] == list(range(8, 15))  # restval, val and test
    assert {a["image_id"] for a in val2014["annotations"]} == set(range(8, 15))
    test2014 = json.loads((coco_world / "annotations" / "image_info_test2014.json").read_text())
    assert "annotations" not in test2014 and len(test2014["images"]) == 2
    assert all((coco_world / "test2014" / image["file_name"]).is_file() for image in test2014["images"])
    validation = json.loads((coco_world / "nocaps" / "nocaps_val_4500_captions.json").read_text())
    assert [image["id"] for image in validation["images"]] == [0, 1]
    assert [image["domain"] for image in validation["images"]] == ["in-domain", "out-domain"]
    assert {a["image_id"] for a in validation["annotations"]} == {0, 1}
    test = json.loads((coco_world / "nocaps" / "nocaps_test_image_info.json").read_text())
    assert "annotations" not in test
    assert all((coco_world / "nocaps" / "test" / image["file_name"]).is_file() for image in test["images"])
    held_out = set(domain_spec("synthetic").held_out_pairs())
    by_id = {a["image_id"]: a["caption"] for a in validation["annotations"]}
    assert {m for m in mentioned_objects(by_id[1]) if m[0]} & held_out  # out-domain: a held-out pair
    assert not {m for m in mentioned_objects(by_id[0]) if m[0]} & held_out


def test_coco_world_is_the_same_with_one_worker(coco_world, tmp_path):
    make_synthetic.main(["--layout", "coco-karpathy", "--domain", "synthetic", "--output-dir", str(tmp_path),
                         "--num-images", "10", "--image-size", "48", "--num-workers", "1"])  # fmt: skip
    assert (tmp_path / "dataset_coco.json").read_text() == (coco_world / "dataset_coco.json").read_text()
    for name in ("train2014/COCO_train2014_000000000001.jpg", "test2014/COCO_test2014_000000000015.jpg"):
        assert (tmp_path / name).read_bytes() == (coco_world / name).read_bytes()


def test_coco_split_sizes_follow_coco():
    sizes = coco_split_sizes(1000)
    assert sizes["train"] + sizes["restval"] == 1000 and sizes["restval"] == 270
    assert all(sizes[part] == 100 for part in ("val", "test", "test2014", "nocaps_val", "nocaps_test"))
    with pytest.raises(ValueError, match="at least 2"):
        coco_split_sizes(1)
    assert make_synthetic.parse_args(["--output-dir", "x", "--layout", "coco-karpathy"]).image_size == 480


# ----------------------------------------------------------------------------------------------------------------
# The scene world (`--domain scenes`): the properties, measured on small worlds with seeds of their own
from collections import Counter  # noqa: E402

from modeling_fsgr_pma.data import scenes  # noqa: E402
from modeling_fsgr_pma.evaluation.faithfulness import caption_mentions, faithfulness_metrics  # noqa: E402

SCENE_IMAGES = 40


@pytest.fixture(scope="module")
def scene_world(tmp_path_factory) -> Path:
    """40 training images and 4 in every other split, through the script's defaults."""
    directory = tmp_path_factory.mktemp("scenes")
    make_synthetic.main(["--output-dir", str(directory), "--num-images", str(SCENE_IMAGES), "--seed", "31"])
    return directory


@pytest.fixture(scope="module")
def sampled_scenes() -> list[tuple[dict, list[tuple[str, str]]]]:
    """1,500 training scenes with their five (structure, caption) pairs, without rendering (fast)."""
    examples = []
    for index in range(1500):
        record, rng = scenes.sample_example("train", index, seed=977)
        examples.append((record, scenes.compose_captions(record, rng)))
    return examples


def test_scene_world_files_columns_and_world_json(scene_world):
    info = json.loads((scene_world / "world.json").read_text())
    assert info["domain"] == "scenes" and info["seed"] == 31 and info["image_size"] == 96
    assert info["counts"] == {"train": SCENE_IMAGES} | dict.fromkeys(scenes.SPLITS[1:], 4)
    assert len(info["categories"]) >= 40 and len(info["out_domain_categories"]) >= 5
    assert len(info["scene_types"]) >= 6
    for split in scenes.SPLITS:
        rows = read_split(scene_world, split)
        assert len(rows) == info["counts"][split]
        row = rows[0]
        assert set(row) == {"image_id", "image", "captions", "objects", "relations", "scene"}
        assert len(row["captions"]) == 5 and len(set(row["captions"])) == 5
        assert {"category", "colour", "size", "pattern", "count", "group", "salient", "x", "y", "box"} <= set(
            row["objects"][0]
        )
        assert Image.open(BytesIO(row["image"]["bytes"])).size == (96, 96)
        for obj in row["objects"]:
            assert 1 <= obj["count"] <= 4 and obj["count"] == sum(o["group"] == obj["group"] for o in row["objects"])
            assert obj["box"][0] < obj["x"] < obj["box"][2] and obj["box"][1] < obj["y"] < obj["box"][3]
        assert any(obj["salient"] for obj in row["objects"])


def test_scene_world_is_deterministic_per_seed(scene_world, tmp_path):
    make_synthetic.main(["--output-dir", str(tmp_path / "again"), "--num-images", str(SCENE_IMAGES), "--seed", "31"])
    make_synthetic.main(["--output-dir", str(tmp_path / "other"), "--num-images", str(SCENE_IMAGES), "--seed", "32"])
    for split in ("train", "test_out_domain"):
        same = read_split(tmp_path / "again", split)
        assert same == read_split(scene_world, split)
        assert [r["captions"] for r in read_split(tmp_path / "other", split)] != [r["captions"] for r in same]


def test_out_domain_categories_only_in_test_out_domain(scene_world):
    out_domain = set(scenes.OUT_DOMAIN)
    for split in scenes.SPLITS:
        for row in read_split(scene_world, split):
            categories = {o["category"] for o in row["objects"]}
            named = {m.category for caption in row["captions"] for m in caption_mentions(caption)}
            assert named <= categories, row["captions"]
            if split == "test_out_domain":
                assert categories & out_domain, row["image_id"]
            else:
                assert not (categories | named) & out_domain, row["image_id"]
    assert set(scenes.OUT_DOMAIN) <= set(scenes.concept_vocabulary())
    concepts = (Path(__file__).parents[1] / "configuration/concepts/scenes.txt").read_text().splitlines()
    assert concepts == scenes.concept_vocabulary()


def test_novel_combinations_never_in_training(sampled_scenes, scene_world):
    held_colours, held_scenes = set(scenes.HELD_OUT_COLOURS), set(scenes.HELD_OUT_SCENES)
    for record, captions in sampled_scenes:
        scene = record["scene"]["type"]
        assert not {(o["colour"], o["category"]) for o in record["objects"]} & held_colours
        assert not {(o["category"], scene) for o in record["objects"]} & held_scenes
        for _, caption in captions:
            for mention in caption_mentions(caption):
                assert (mention.category, scene) not in held_scenes, caption
                assert not {(v, mention.category) for k, v in mention.attributes if k == "colour"} & held_colours
    for row in read_split(scene_world, "test_novel"):
        pairs = {(o["colour"], o["category"]) for o in row["objects"]} & held_colours
        pairs |= {(o["category"], row["scene"]["type"]) for o in row["objects"]} & held_scenes
        assert pairs, row["image_id"]


def test_scene_properties(sampled_scenes):
    """≥ 40 categories, ≥ 6 scene types with different object distributions, counts 1–4, all five relations, a
    long tail (the top 10 categories about half of the objects, ≥ 10 categories under 1 %)."""
    groups, by_scene, counts, predicates = Counter(), {}, Counter(), Counter()
    for record, _ in sampled_scenes:
        per_group = {o["group"]: o for o in record["objects"]}
        groups.update(o["category"] for o in per_group.values())
        by_scene.setdefault(record["scene"]["type"], Counter()).update(o["category"] for o in per_group.values())
        counts.update(o["count"] for o in per_group.values())
        predicates.update(r["predicate"] for r in record["relations"])
    assert len(groups) >= 40 and len(by_scene) >= 6
    assert set(counts) == {1, 2, 3, 4} and set(predicates) == set(scenes.RELATIONS)
    total = sum(groups.values())
    shares = sorted((n / total for n in groups.values()), reverse=True)
    assert 0.4 <= sum(shares[:10]) <= 0.6
    assert sum(share < 0.01 for share in shares) >= 10
    names = list(by_scene)
    for i, a in enumerate(names):  # context predicts objects: every two scene types differ (total variation)
        for b in names[i + 1 :]:
            pa = {k: v / sum(by_scene[a].values()) for k, v in by_scene[a].items()}
            pb = {k: v / sum(by_scene[b].values()) for k, v in by_scene[b].items()}
            distance = 0.5 * sum(abs(pa.get(k, 0) - pb.get(k, 0)) for k in set(pa) | set(pb))
            assert distance > 0.3, (a, b, distance)


def test_caption_grammar(sampled_scenes):
    """≥ 12 structures, none over 15 % of the captions, ≥ 300 distinct words, salient objects named, five captions
    of five structures per image."""
    structures, words, recall = Counter(), set(), []
    for record, captions in sampled_scenes[:400]:
        assert len({name for name, _ in captions}) == 5
        structures.update(name for name, _ in captions)
        words.update(word for _, caption in captions for word in caption.split() if word.isalpha())
        for _, caption in captions:
            assert caption == caption.lower().strip()
    assert len(structures) >= 12 and max(structures.values()) / sum(structures.values()) <= 0.15
    assert len(words) >= 300
    references = {str(k): captions[0][1] for k, (_, captions) in enumerate(sampled_scenes[:400])}
    objects = {str(k): record["objects"] for k, (record, _) in enumerate(sampled_scenes[:400])}
    relations = {str(k): record["relations"] for k, (record, _) in enumerate(sampled_scenes[:400])}
    scores = faithfulness_metrics(references, objects, relations)
    assert scores["chair_i"] == 0 and scores["attribute_error_rate"] == 0 and scores["count_error_rate"] == 0
    assert scores["relation_error_rate"] == 0 and 0.5 < scores["object_recall"] < 1  # salient, not every object


def test_oracle_captions_follow_the_grammar_and_the_truth(sampled_scenes):
    records = {str(k): record for k, (record, _) in enumerate(sampled_scenes[:60])}
    for candidates in (1, 4):
        captions = scenes.oracle_captions(records, seed=3, candidates=candidates)
        assert set(captions) == set(records)
        objects = {k: r["objects"] for k, r in records.items()}
        scores = faithfulness_metrics(captions, objects, {k: r["relations"] for k, r in records.items()})
        assert scores["chair_i"] == 0 and scores["chair_s"] == 0 and scores["relation_error_rate"] == 0
    assert scenes.oracle_captions(records, seed=3) == scenes.oracle_captions(records, seed=3)
    with pytest.raises(ValueError, match="candidates"):
        scenes.oracle_captions(records, candidates=0)


def test_clip_pretraining_set_holds_the_out_domain_categories_and_the_held_out_combinations():
    seen, colour_pairs, scene_pairs = set(), set(), set()
    for index in range(300):
        record, _ = scenes.sample_example("train", index, seed=5, pretraining=True)
        seen |= {o["category"] for o in record["objects"]}
        colour_pairs |= {(o["colour"], o["category"]) for o in record["objects"]}
        scene_pairs |= {(o["category"], record["scene"]["type"]) for o in record["objects"]}
    assert set(scenes.OUT_DOMAIN) <= seen
    assert set(scenes.HELD_OUT_COLOURS) <= colour_pairs and set(scenes.HELD_OUT_SCENES) <= scene_pairs
    for index in range(100):  # the captioning world's train split holds neither
        record, _ = scenes.sample_example("train", index, seed=5)
        assert not {(o["colour"], o["category"]) for o in record["objects"]} & set(scenes.HELD_OUT_COLOURS)
        assert not {o["category"] for o in record["objects"]} & set(scenes.OUT_DOMAIN)
    with pytest.raises(SystemExit):
        make_synthetic.parse_args(["--output-dir", "x", "--domain", "synthetic", "--clip-pretraining"])


def test_second_scene_world_holds_an_out_domain_category_in_every_image(tmp_path):
    world = make_synthetic.main(["--output-dir", str(tmp_path), "--domain", "scenes-b", "--num-images", "12",
                                 "--seed", "3"])  # fmt: skip
    assert world["domain"] == "scenes-b" and set(world["counts"]) == {"train", "validation", "test"}
    rows = read_split(tmp_path, "train")
    assert all(row["image_id"].startswith("scenes-b-train-") for row in rows)
    for row in rows:
        assert {o["category"] for o in row["objects"]} & set(scenes.OUT_DOMAIN), row["image_id"]
    first_world = [scenes.sample_example("train", i, seed=3)[0] for i in range(12)]
    assert [row["objects"] for row in rows] != [record["objects"] for record in first_world]
    with pytest.raises(SystemExit):
        make_synthetic.parse_args(["--output-dir", "x", "--domain", "scenes-b", "--layout", "coco-karpathy"])


def test_scene_patch_owners_follow_the_icons():
    """`scenes.patch_objects` marks a patch with the object drawn over most of it, and the sky as background."""
    record, _ = scenes.sample_example("train", 7, seed=11)
    owners = scenes.patch_objects(record["objects"], 96, 8)
    assert owners.shape == (64,) and set(owners.tolist()) <= {-1, *range(len(record["objects"]))}
    for index, obj in enumerate(record["objects"]):
        if (obj["box"][2] - obj["box"][0]) * 96 >= 24:  # an object of two patches or more shows in its own patch
            centre = min(int(obj["y"] * 8), 7) * 8 + min(int(obj["x"] * 8), 7)
            assert owners[centre] in (index, *range(index + 1, len(record["objects"]))), obj
    assert scenes.patch_objects([], 96, 8).tolist() == [-1] * 64


def test_scene_world_in_coco_layout_has_nocaps_domains(tmp_path):
    make_synthetic.main(["--layout", "coco-karpathy", "--output-dir", str(tmp_path), "--num-images", "30",
                         "--image-size", "48", "--num-workers", "1"])  # fmt: skip
    validation = json.loads((tmp_path / "nocaps" / "nocaps_val_4500_captions.json").read_text())
    assert [image["domain"] for image in validation["images"]] == ["in-domain", "near-domain", "out-domain"]
    by_id = {}
    for annotation in validation["annotations"]:
        by_id.setdefault(annotation["image_id"], []).append(annotation["caption"])
    named = {m.category for caption in by_id[2] for m in caption_mentions(caption)}
    assert named & set(scenes.OUT_DOMAIN)
    images = json.loads((tmp_path / "dataset_coco.json").read_text())["images"]
    assert all(len(image["sentences"]) == 5 for image in images)
    assert json.loads((tmp_path / "world.json").read_text())["domain"] == "scenes"
