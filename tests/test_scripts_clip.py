"""Smoke tests of the CLIP-side scripts (open_clip's `test_training_simple.py` style): pre-train a tiny CLIP on a
tiny synthetic world, build its concept codebook, cache the frozen-prefix features, and check that the cache gives
the captioner the same logits as the pixels."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from modeling_fsgr_pma import FsgrPmaConfig, FsgrPmaForConditionalGeneration
from modeling_fsgr_pma.training.clip_backbone import build_clip, load_codebook, load_pretrained_clip
from modeling_fsgr_pma.data.captions import load_caption_split, to_rgb
from modeling_fsgr_pma.data.feature_cache import check_cache_matches, load_feature_cache
from modeling_fsgr_pma.processing_fsgr_pma import clip_image_processor
from modeling_fsgr_pma.data.synthetic import generate_world, patch_objects
from scripts import build_codebook, extract_features, train
from tools import pretrain_clip, probe_vision

VOCABULARY = Path(__file__).resolve().parents[1] / "configuration" / "concepts" / "synthetic.txt"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A 48-image world at 32 px, the default tiny tower's model config, and the outputs of the three scripts."""
    root = tmp_path_factory.mktemp("clip_scripts")
    generate_world(root / "world", num_images=48, seed=0, image_size=32)
    model_config = root / "model.json"
    # The bare default config: a 32 px, 2-block tower of width 32 (the smallest preset).
    concepts = len([line for line in VOCABULARY.read_text().splitlines() if line.strip()])
    FsgrPmaConfig(lora_first_block=1, concept_top_k=4, dropout=0.0, num_concepts=concepts).to_json_file(model_config)
    paths = {
        "data": root / "world",
        "model_config": model_config,
        "clip": root / "clip.safetensors",
        "codebook": root / "codebook.safetensors",
        "features": root / "features",
    }
    pretrain_clip.main(
        ["--data", str(paths["data"]), "--model-config", str(model_config), "--output", str(paths["clip"]),
         "--epochs", "1", "--batch-size", "16", "--seed", "0"]
    )  # fmt: skip
    build_codebook.main(
        ["--model-config", str(model_config), "--clip-pretrained", str(paths["clip"]),
         "--vocabulary", str(VOCABULARY), "--output", str(paths["codebook"]), "--templates", "{}"]
    )  # fmt: skip
    extract_features.main(
        ["--model-config", str(model_config), "--clip-pretrained", str(paths["clip"]),
         "--codebook", str(paths["codebook"]), "--data", str(paths["data"]),
         "--splits", "train", "validation", "--output-dir", str(paths["features"]), "--batch-size", "16",
         "--num-workers", "0"]
    )  # fmt: skip
    return paths


def test_pretrain_checkpoint_loads_with_open_clip(workspace):
    checkpoint = load_file(workspace["clip"])
    assert all(tensor.dtype == torch.float16 for tensor in checkpoint.values())
    config = FsgrPmaConfig.from_json_file(workspace["model_config"])
    clip = build_clip(config.clip_config)
    open_clip.load_checkpoint(clip, str(workspace["clip"]))
    assert set(clip.state_dict()) == set(checkpoint)
    for name, tensor in clip.state_dict().items():
        torch.testing.assert_close(tensor, checkpoint[name].float())


def test_pretraining_image_embedding_is_clips_and_dense_embeddings_are_the_captioners(workspace):
    pretrain = pretrain_clip
    config = FsgrPmaConfig.from_json_file(workspace["model_config"])
    model = pretrain.TinyClipPretraining(config).eval()
    pixels = torch.randn(3, 3, config.image_size, config.image_size)
    with torch.no_grad():
        image, dense, _ = model.encode_image(pixels)
        torch.testing.assert_close(image, torch.nn.functional.normalize(model.clip.encode_image(pixels), dim=-1))
        captioner = FsgrPmaForConditionalGeneration(FsgrPmaConfig(**{**config.to_dict(), "lora_merged": True}))
        captioner.load_clip_vision_weights(model.clip.visual.state_dict())
        expected = captioner.encoder.encode_image(captioner.encoder.tower.frozen_prefix(pixels))[3]
    torch.testing.assert_close(dense, torch.nn.functional.normalize(expected, dim=-1))


def test_pretraining_targets_name_each_patchs_object_or_background(workspace):
    pretrain = pretrain_clip
    config = FsgrPmaConfig.from_json_file(workspace["model_config"])
    split = load_caption_split(workspace["data"], "train").select(range(8))
    targets = pretrain.phrase_targets(split, "synthetic", config)
    assert targets.patch_phrases.shape == (8, config.num_patches)
    for row, (objects, background) in enumerate(zip(split["objects"], split["background"])):
        names = {targets.phrases[i] for i in targets.patch_phrases[row].tolist()}
        expected = {f"{o['colour']} {o['shape']}" for o in objects} | {f"{background['tone']} background"}
        assert names <= expected and f"{background['tone']} background" in names
        assert {targets.phrases[i] for i in targets.image_phrases[row]} == expected


def test_scene_world_targets_name_categories_colours_and_scene(tmp_path):
    """Scene world: a patch's phrase is its object's category or the scene type, its colour target the object's
    colour; the image's positives are its categories and scene type; the loss (with the colour term) is finite."""
    from modeling_fsgr_pma.data import scenes

    scenes.generate_world(tmp_path, num_images=6, seed=2, image_size=32)
    config = FsgrPmaConfig(num_concepts=len(scenes.concept_vocabulary()))  # 32 px, patches of 8
    split = load_caption_split(tmp_path, "train")
    targets = pretrain_clip.phrase_targets(split, scenes.DOMAIN, config)
    assert targets.patch_phrases.shape == targets.patch_colours.shape == (6, config.num_patches)
    for row, (objects, scene) in enumerate(zip(split["objects"], split["scene"])):
        categories = {o["category"] for o in objects}
        assert {targets.phrases[i] for i in targets.image_phrases[row]} == categories | {scene["type"]}
        for phrase, colour in zip(targets.patch_phrases[row].tolist(), targets.patch_colours[row].tolist()):
            if targets.phrases[phrase] == scene["type"]:
                assert colour == -1
            else:
                assert targets.phrases[phrase] in categories
                assert (targets.phrases[colour], targets.phrases[phrase]) in {(o["colour"], o["category"]) for o in objects}
    assert (targets.patch_colours >= 0).any()
    model = pretrain_clip.TinyClipPretraining(config)
    tokenizer = pretrain_clip.clip_tokenizer(config.clip_config)
    pixels = pretrain_clip.pixel_tensor(clip_image_processor(config), split["image"])
    losses = pretrain_clip.pretraining_loss(model, pixels, tokenizer([c[0] for c in split["captions"]]),
                                            tokenizer(targets.phrases), targets, open_clip.loss.ClipLoss())
    assert all(torch.isfinite(value) for value in losses.values())
    report = pretrain_clip.validation_report(model, tokenizer, pixels, [c[0] for c in split["captions"]], targets)
    assert set(report) == {"retrieval_top1", "object_patch_category", "object_patch_colour"}


def test_probe_pools_each_object_over_its_own_patches():
    """An object's probe features pool the patches it owns (as pre-training assigns them); an object that owns none
    (hidden behind a later one) falls back to its centre patch and is marked as not shown."""
    config = FsgrPmaConfig()  # the default tiny tower: 32 px
    big = {"shape": "square", "colour": "red", "size": "large", "x": 0.5, "y": 0.5}
    hidden = {**big, "size": "small", "colour": "blue"}  # drawn first, then covered by the large square
    centres = probe_vision.centre_patches([hidden, big], config.grid_size)
    masks = probe_vision.object_patches([hidden, big], centres, config, scene_world=False)
    (hidden_mask, hidden_visible), (big_mask, big_visible) = masks
    owners = patch_objects([hidden, big], config.image_size, config.grid_size)
    assert (owners == 0).sum() == 0 and (owners == 1).sum() > 1
    assert big_mask.tolist() == (owners == 1).tolist() and big_visible
    assert hidden_mask.nonzero().flatten().tolist() == [centres[0]] and not hidden_visible


def test_probe_vision_reports_every_point_on_every_object(workspace, tmp_path):
    """The CLIP alone (no captioner): probes at the frozen blocks, the tower and the encoder output, fitted on every
    train object and scored on the shown test objects and on all of them, and the concept-path facts, each a share
    in [0, 1]."""
    report = probe_vision.main(
        ["--clip-pretrained", str(workspace["clip"]), "--model-config", str(workspace["model_config"]),
         "--codebook", str(workspace["codebook"]), "--data", str(workspace["data"]), "--splits", "test",
         "--output", str(tmp_path / "probe.json")]
    )  # fmt: skip
    assert json.loads((tmp_path / "probe.json").read_text()) == report
    splits = {split: load_caption_split(workspace["data"], split) for split in ("train", "test")}
    objects = {split: sum(map(len, data["objects"])) for split, data in splits.items()}
    assert report["fit"] == {"split": "train", "objects": objects["train"]}
    test = report["splits"]["test"]
    assert test["objects"] == objects["test"] and 0 < test["visible_objects"] <= test["objects"]
    points = {"frozen_blocks", "pretrained_tower", "encoder_output"}
    assert set(test["probes"]) == set(test["probes_all_objects"]) == points
    probes = [*test["probes"].values(), *test["probes_all_objects"].values()]
    shares = [share for point in probes for share in point.values()]
    shares += list(test["concepts"]["pretrained"].values())
    assert len(shares) == 15 and all(0.0 <= share <= 1.0 for share in shares)


def test_codebook_shape_unit_rows_and_names(workspace):
    codebook, names = load_codebook(workspace["codebook"])
    expected_names = [line.strip() for line in VOCABULARY.read_text().splitlines() if line.strip()]
    config = FsgrPmaConfig.from_json_file(workspace["model_config"])
    assert names == expected_names
    assert codebook.shape == (len(expected_names), config.clip_embed_dim)
    torch.testing.assert_close(codebook.norm(dim=-1), torch.ones(len(names)))
    assert not torch.allclose(codebook[0], codebook[1])


def test_pretrained_tag_errors_are_clear():
    config = FsgrPmaConfig()
    with pytest.raises(ValueError, match="clip_model_name"):
        load_pretrained_clip(config.clip_config, None, "openai")
    with pytest.raises(ValueError, match="neither a checkpoint file nor an open_clip tag"):
        load_pretrained_clip(config.clip_config, "ViT-B-16", "no-such-tag")
    with pytest.raises(ValueError, match="does not exist"):
        load_pretrained_clip(config.clip_config, None, "missing/clip.pt")


def _cached_model(workspace) -> tuple[FsgrPmaForConditionalGeneration, FsgrPmaConfig]:
    """The captioner exactly as extract_features.py builds it."""
    codebook, names = load_codebook(workspace["codebook"])
    args = extract_features.parse_args(
        ["--model-config", str(workspace["model_config"]), "--clip-pretrained", str(workspace["clip"]),
         "--codebook", str(workspace["codebook"]), "--data", str(workspace["data"]), "--output-dir", "unused"]
    )  # fmt: skip
    config = extract_features.cache_config(args, names)
    model = FsgrPmaForConditionalGeneration(config).eval()
    clip = load_pretrained_clip(config.clip_config, config.clip_model_name, str(workspace["clip"]))
    model.load_clip_vision_weights(clip.visual.state_dict())
    model.set_codebook(codebook, names)
    return model, config


@torch.no_grad()
def test_cached_features_give_the_same_logits(workspace):
    model, config = _cached_model(workspace)
    data = load_caption_split(workspace["data"], "validation")
    cache = load_feature_cache(workspace["features"], "validation")
    hidden, labels = cache.read(range(len(cache)))
    assert cache.image_ids == list(data["image_id"])
    assert hidden.dtype == torch.float16 and hidden.shape == (len(data), 1 + config.num_patches, config.vision_width)
    assert labels.dtype == torch.int64 and labels.shape == (len(data), config.num_patches)
    assert int(labels.min()) >= 0 and int(labels.max()) < config.num_concepts

    pixels = clip_image_processor(config)([to_rgb(im) for im in data["image"]], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(hidden.float(), model.encoder.tower.frozen_prefix(pixels), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(labels, model.encoder.pseudo_labels(hidden.float()))
    input_ids = torch.randint(3, config.vocab_size, (len(data), 7))
    input_ids[:, 0] = config.bos_token_id
    from_pixels = model(pixel_values=pixels, input_ids=input_ids).logits
    from_cache = model(vision_hidden_states=hidden, input_ids=input_ids).logits
    torch.testing.assert_close(from_cache, from_pixels, atol=2e-2, rtol=2e-2)


def test_cache_manifest_mismatch_raises(workspace):
    _, config = _cached_model(workspace)
    manifest = json.loads((workspace["features"] / "cache.json").read_text())
    assert manifest["lora_first_block"] == 1 and manifest["image_size"] == config.image_size
    assert manifest["codebook_path"] == str(workspace["codebook"].resolve())
    codebook, _ = load_codebook(workspace["codebook"])
    check_cache_matches(workspace["features"], config, codebook)
    changed = FsgrPmaConfig(**{**config.to_dict(), "lora_first_block": 0})
    with pytest.raises(ValueError, match="lora_first_block"):
        check_cache_matches(workspace["features"], changed)
    prompted = FsgrPmaConfig(**{**config.to_dict(), "num_prompt_tokens": 2})  # every block then sees prompts
    with pytest.raises(ValueError, match="num_prompt_tokens"):
        check_cache_matches(workspace["features"], prompted)
    relabelled = FsgrPmaConfig(**{**config.to_dict(), "dense_attention": "maskclip"})  # the cache's labels: SCLIP
    with pytest.raises(ValueError, match="dense_attention"):
        check_cache_matches(workspace["features"], relabelled)
    with pytest.raises(ValueError, match="codebook_sha256"):
        check_cache_matches(workspace["features"], config, codebook.flip(0))


def test_train_from_the_feature_cache_never_reads_an_image(workspace, tmp_path, monkeypatch):
    """train.py --feature-cache trains (XE and SCST) and evaluates without decoding an image for a batch."""
    import modeling_fsgr_pma.data.captions as data_module

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded although the feature cache replaces the pixels")

    monkeypatch.setattr(data_module.Image, "decode_example", no_decoding)
    summary = train.main(
        ["--data", str(workspace["data"]), "--model-config", str(workspace["model_config"]),
         "--clip-pretrained", str(workspace["clip"]), "--codebook", str(workspace["codebook"]),
         "--feature-cache", str(workspace["features"]), "--output-dir", str(tmp_path / "run"),
         "--batch-size", "8", "--eval-batch-size", "16", "--vocab-size", "64", "--warmup-steps", "1",
         "--config-overrides", "memory_warmup_steps=2", "--kmeans-backend", "torch", "--report-to", "none", "--max-new-tokens", "6",
         "--num-beams", "1", "--xe-steps", "3", "--scst-steps", "1", "--scst-num-sequences", "2", "--eval-every", "4"]
    )  # fmt: skip
    assert summary["steps"] == 4 and summary["history"]


@torch.no_grad()
def test_clip_pretrained_file_for_the_vit_b16_preset(tmp_path):
    """`--clip-pretrained FILE` with an open_clip ViT-B/16 checkpoint (fp16 safetensors, as open_clip's Hub copies of
    OpenAI's weights are stored): every weight arrives, and the captioner's tower computes what open_clip's does."""
    from safetensors.torch import save_file

    config = FsgrPmaConfig.from_json_file(Path(__file__).resolve().parents[1] / "configuration/model/vit-b16.json")
    torch.manual_seed(0)
    written = build_clip(config.clip_config)
    checkpoint = tmp_path / "open_clip_vit_b16.safetensors"
    save_file({name: tensor.half().contiguous() for name, tensor in written.state_dict().items()}, str(checkpoint))
    clip = load_pretrained_clip(config.clip_config, config.clip_model_name, str(checkpoint))
    for name, tensor in written.state_dict().items():
        torch.testing.assert_close(clip.state_dict()[name], tensor.half().float(), msg=name)
    model = FsgrPmaForConditionalGeneration(config).eval()
    model.load_clip_vision_weights(clip.visual.state_dict())
    pixels = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(model.encoder.tower.visual(pixels), clip.visual(pixels))  # LoRA starts as identity
