"""What the vision side sees: linear probes of category and colour, and whether the FSGR concepts name the objects.

Usage (after `scripts/demo.py`; without `--model`, the CLIP alone, its LoRA untrained):

    python tools/probe_vision.py --model outputs/demo/model --clip-pretrained outputs/demo/clip.safetensors \
        --data outputs/demo/data --output outputs/demo/probe_vision.json

Linear probes: for every object of a synthetic-world image, the features of the patches that show it are averaged
(mask pooling over the object's own patches, by the ownership rule CLIP pre-training uses: `patch_objects`; the
patch holding its centre when an object owns none, hidden behind others or too small to cover a quarter of a
patch), and a multinomial logistic regression (standardised features, L2 penalty, L-BFGS) fitted on the objects of
`--fit-split` predicts its category (the scene world's category, the shape world's shape) and its colour on the
objects of each `--splits` entry. `probes` scores the objects the patches show (those that own a patch, the
objects of CLIP pre-training's patch targets), `probes_all_objects` every object. Probed points, from the input
upwards:

- `frozen_blocks`: the output of the blocks below `lora_first_block` (what the feature cache stores);
- `pretrained_tower`: the tower's patch tokens (after `ln_post`) with the pre-trained CLIP weights;
- `adapted_tower`: the same with the trained captioner's tower (its LoRA merged), with `--model`;
- `encoder_output`: the visual memory Z the decoder cross-attends to (after the FSGR interaction layers).

FSGR concept path, per object (a concept names a category, a colour, a pattern or a scene type in the scene world;
"colour shape" or "tone background" in the shape world):

- `topk_has_category`: one of the image's `concept_top_k` pre-selected concepts names the object's category;
- `dense_argmax_category`: the pseudo-label of the object's centre patch (the frozen tower's dense embedding's
  argmax over the whole codebook, as SupCon uses it) names its category;
- `assigned_category`: the concept the quantiser assigns to that patch (argmax among the pre-selected; the trained
  tower with `--model`) names its category.

Writes one JSON with every figure per split, the objects counted, and the goals: category ≥ 0.90 and colour ≥ 0.95
for the probes of the tower on the objects the patches show; top-k category ≥ 0.90; dense argmax category ≥ 0.70
(both over every object).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modeling_fsgr_pma import FsgrPmaConfig, FsgrPmaForConditionalGeneration
from modeling_fsgr_pma.training.clip_backbone import load_codebook, load_pretrained_clip
from modeling_fsgr_pma.data import scenes, synthetic
from modeling_fsgr_pma.data.captions import load_caption_split, to_rgb
from modeling_fsgr_pma.cli.loading import load_pretrained
from modeling_fsgr_pma.processing_fsgr_pma import clip_image_processor

logger = logging.getLogger(__name__)

GOALS = {"probe_category": 0.90, "probe_colour": 0.95, "topk_has_category": 0.90, "dense_argmax_category": 0.70}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="trained captioner directory (save_pretrained)")
    parser.add_argument("--clip-pretrained", required=True, help="the CLIP checkpoint the captioner started from")
    parser.add_argument("--model-config", type=Path, default=None, help="without --model: the model preset")
    parser.add_argument("--codebook", type=Path, default=None, help="without --model: build_codebook.py's output")
    parser.add_argument("--data", required=True, help="a synthetic world (scripts/make_synthetic.py)")
    parser.add_argument("--fit-split", default="train")
    parser.add_argument("--fit-images", type=int, default=None,
                        help="images of --fit-split the probes are fitted on (default: all)")
    parser.add_argument("--splits", nargs="+", default=["test", "test_novel"])
    parser.add_argument("--max-images", type=int, default=1000, help="images per evaluated split")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.model is None and (args.model_config is None or args.codebook is None):
        parser.error("without --model, pass --model-config and --codebook (the CLIP is probed on its own)")
    return args


def build_models(args: argparse.Namespace) -> dict[str, FsgrPmaForConditionalGeneration]:
    """`pretrained` (the CLIP's tower, its LoRA at zero) and, with `--model`, `trained`; both in eval mode."""
    if args.model is not None:
        trained, _ = load_pretrained(args.model)
        config = FsgrPmaConfig(**{**trained.config.to_dict(), "lora_merged": True})
        pretrained = FsgrPmaForConditionalGeneration(config)
        pretrained.load_state_dict(trained.state_dict())  # decoder, codebook, interaction layers as trained
    else:
        codebook, names = load_codebook(args.codebook)
        config = FsgrPmaConfig.from_json_file(args.model_config)
        config = FsgrPmaConfig(**{**config.to_dict(), "num_concepts": len(names), "concept_names": names,
                                  "concept_top_k": min(config.concept_top_k, len(names)), "lora_merged": True})
        pretrained, trained = FsgrPmaForConditionalGeneration(config), None
        pretrained.set_codebook(codebook, names)
    clip = load_pretrained_clip(config.clip_config, config.clip_model_name, args.clip_pretrained)
    pretrained.load_clip_vision_weights(clip.visual.state_dict())
    models = {"pretrained": pretrained.eval()}
    if trained is not None:
        models["trained"] = trained.eval()
    return models


def centre_patches(objects: list[dict], grid: int) -> list[int]:
    """Index of the patch holding each object's centre."""
    return [min(int(o["y"] * grid), grid - 1) * grid + min(int(o["x"] * grid), grid - 1) for o in objects]


def object_patches(
    objects: list[dict], centres: list[int], config: FsgrPmaConfig, scene_world: bool
) -> list[tuple[torch.Tensor, bool]]:
    """Per object, a boolean `(n,)` mask of the patches that show it and whether there are any; an object that owns
    none (hidden behind others, or too small to cover a quarter of a patch) gets its centre patch (`centres`, from
    `centre_patches`)."""
    owners = (scenes if scene_world else synthetic).patch_objects(objects, config.image_size, config.grid_size)
    masks = []
    for index, centre in enumerate(centres):
        mask = torch.from_numpy(owners == index)
        visible = bool(mask.any())
        if not visible:
            mask[centre] = True
        masks.append((mask, visible))
    return masks


def object_category(obj: dict) -> str:
    """The scene world's category, or the shape world's shape."""
    return obj["category"] if "category" in obj else obj["shape"]


def names_category(concept: str, category: str, scene_world: bool) -> bool:
    """Whether a concept names the category: the scene world's own word ("pine tree" is not a "tree"), the shape
    world's "colour shape"."""
    return concept == category if scene_world else concept.split(" ")[-1] == category


@torch.no_grad()
def describe_split(models: dict, data, processor, scene_world: bool, batch_size: int = 100) -> dict:
    """Per object: its category, colour, mask-pooled features at every probed point, and its concept-path facts."""
    config = models["pretrained"].config
    grid, n = config.grid_size, config.num_patches
    names = config.concept_names
    rows = {"category": [], "colour": [], "visible": [], "features": {}, "concepts": {}}
    for start in tqdm(range(0, len(data), batch_size), desc="probing", leave=False):
        batch = data[start : start + batch_size]
        pixels = processor([to_rgb(image) for image in batch["image"]], return_tensors="pt")["pixel_values"]
        points, facts = {}, {}
        for which, model in models.items():
            encoder = model.encoder
            prefix = encoder.frozen_prefix(pixels, None)  # (B, 1 + n, d_v)
            patches, _, global_embedding, dense = encoder.encode_image(prefix)
            _, patch_concepts, selected, _ = encoder.quantize(dense, global_embedding)
            memory = encoder(pixel_values=pixels).last_hidden_state[:, :n]  # (B, n, d)
            if which == "pretrained":
                points["frozen_blocks"] = prefix[:, 1:]
                points["pretrained_tower"] = patches
                facts["pretrained"] = (selected, encoder.pseudo_labels(prefix), patch_concepts)
            else:
                points["adapted_tower"] = patches
                facts["trained"] = (selected, encoder.pseudo_labels(prefix), patch_concepts)
            points["encoder_output"] = memory  # the trained model's, when there is one (it comes last)
        for image, objects in enumerate(batch["objects"]):
            centres = centre_patches(objects, grid)
            masks = object_patches(objects, centres, config, scene_world)
            for obj, centre, (mask, visible) in zip(objects, centres, masks):
                category = object_category(obj)
                rows["category"].append(category)
                rows["colour"].append(obj["colour"])
                rows["visible"].append(visible)
                for point, features in points.items():
                    rows["features"].setdefault(point, []).append(features[image][mask].mean(0))  # (d,)
                for which, (selected, labels, assigned) in facts.items():
                    top = [names[int(i)] for i in selected[image]]
                    dense, quantised = names[int(labels[image, centre])], names[int(assigned[image, centre])]
                    checks = {
                        "topk_has_category": any(names_category(name, category, scene_world) for name in top),
                        "dense_argmax_category": names_category(dense, category, scene_world),
                        "assigned_category": names_category(quantised, category, scene_world),
                    }
                    for key, hit in checks.items():
                        rows["concepts"].setdefault(which, {}).setdefault(key, []).append(hit)
    rows["features"] = {point: torch.stack(values).float() for point, values in rows["features"].items()}
    return rows


def fit_probe(features: torch.Tensor, labels: list[str], weight_decay: float = 1e-3) -> tuple:
    """A multinomial logistic regression on standardised features (full-batch L-BFGS); returns what `predict` needs."""
    classes = sorted(set(labels))
    targets = torch.tensor([classes.index(label) for label in labels])
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std  # (N, D)
    linear = torch.nn.Linear(x.shape[1], len(classes))
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), targets) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return linear, mean, std, classes


@torch.no_grad()
def probe_hits(probe: tuple, features: torch.Tensor, labels: list[str]) -> list[bool]:
    linear, mean, std, classes = probe
    predicted = linear((features - mean) / std).argmax(1).tolist()
    return [classes[p] == label for p, label in zip(predicted, labels)]


def share(hits: list[bool]) -> float:
    return round(sum(hits) / len(hits), 4)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    models = build_models(args)
    processor = clip_image_processor(models["pretrained"].config)

    def load(split: str, limit: int | None):
        data = load_caption_split(args.data, split)
        if "objects" not in data.column_names or "x" not in data.features["objects"].feature:
            raise ValueError(f"{args.data} has no object centres: regenerate it with scripts/make_synthetic.py")
        return data if limit is None else data.select(range(min(limit, len(data))))

    scene_world = json.loads((Path(args.data) / "world.json").read_text())["domain"] == scenes.DOMAIN
    fitted = describe_split(models, load(args.fit_split, args.fit_images), processor, scene_world)
    probes = {
        (point, attribute): fit_probe(features, fitted[attribute])
        for point, features in fitted["features"].items()
        for attribute in ("category", "colour")
    }
    report = {"fit": {"split": args.fit_split, "objects": len(fitted["category"])}, "goals": GOALS, "splits": {}}
    for split in args.splits:
        rows = describe_split(models, load(split, args.max_images), processor, scene_world)
        visible = rows["visible"]
        result = {"objects": len(visible), "visible_objects": sum(visible), "probes": {}, "probes_all_objects": {},
                  "concepts": {}}
        for (point, attribute), probe in probes.items():
            hits = probe_hits(probe, rows["features"][point], rows[attribute])
            result["probes"].setdefault(point, {})[attribute] = share([h for h, v in zip(hits, visible) if v])
            result["probes_all_objects"].setdefault(point, {})[attribute] = share(hits)
        for which, checks in rows["concepts"].items():
            result["concepts"][which] = {key: share(hits) for key, hits in checks.items()}
        report["splits"][split] = result
        logger.info("%s: %s", split, json.dumps(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    logger.info("wrote %s", args.output)
    return report


if __name__ == "__main__":
    main()
