"""Pre-train a synthetic world's tiny open_clip CLIP: captions, object phrases and patch phrases.

Usage (the commands that made the shipped checkpoints; the worlds' seeds are used by no demo):

    # the scene world's, weights/clip-tiny-scenes.safetensors (out-domain categories included, with their names)
    python scripts/make_synthetic.py --clip-pretraining --output-dir outputs/clip-scenes --num-images 24000 --seed 1000
    python tools/pretrain_clip.py --data outputs/clip-scenes --model-config configuration/model/tiny-scenes.json \
        --epochs 20 --batch-size 64 --output weights/clip-tiny-scenes.safetensors

    # the shape world's, weights/clip-tiny-synthetic.safetensors
    python scripts/make_synthetic.py --domain synthetic --output-dir outputs/clip-world --num-images 20000 --seed 1000
    python tools/pretrain_clip.py --data outputs/clip-world --model-config configuration/model/tiny.json \
        --epochs 14 --batch-size 64 --output weights/clip-tiny-synthetic.safetensors

Only for the bundled synthetic worlds: real data starts from OpenAI's weights (`--clip-pretrained openai`). The
checkpoint is an open_clip state dict in safetensors (float16), which `open_clip.load_checkpoint`, and so the
training scripts' `--clip-pretrained PATH`, read as they are.

Each step minimises three contrastive terms, all through open_clip's CLIP (its text tower encodes every caption and
phrase; phrases are the world's concept names: the scene world's categories, colours, patterns and scene types
(`modeling_fsgr_pma.data.scenes.concept_vocabulary`), the shape world's "red circle" and "grey background"):

1. **captions**: open_clip's `ClipLoss` between each image and one of its reference captions;
2. **objects**: the image embedding against the phrases of the batch, the image's own objects (categories) and
   background (scene type) the (equally weighted) positives;
3. **patches**: each patch's MaskCLIP dense embedding (the path the captioner's concept assignment reads,
   `FsgrPmaVisionTower.dense_embeddings`), and its token at the tower's output projected the same way, against the
   same phrases, the positive being the object the patch shows (`scenes.patch_objects`, `synthetic.patch_objects`)
   or else the image's background; object and background patches are averaged apart and weigh the same (most
   patches are background, and easy). In the scene world an object patch also picks its colour among the colours.

Terms 2 and 3 stand in for what 400M web pairs give OpenAI's CLIP: an image embedding that ranks the concepts in
the image, and dense embeddings that name what each patch shows. The pre-training world holds the scene world's
out-domain categories and the held-out combinations of `test_novel` (`--clip-pretraining`), as OpenAI's CLIP has
seen nocaps' out-domain classes and green cars; no captioning image or caption holds either. The log ends with
validation image→caption retrieval and the share of object patches whose dense argmax names the object's category
(shape) and colour.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from modeling_fsgr_pma import FsgrPmaConfig
from modeling_fsgr_pma.training.clip_backbone import build_clip, clip_tokenizer
from modeling_fsgr_pma.data.captions import load_caption_split, to_rgb
from modeling_fsgr_pma.modeling_fsgr_pma import FsgrPmaVisionTower
from modeling_fsgr_pma.processing_fsgr_pma import clip_image_processor
from modeling_fsgr_pma.data import scenes
from modeling_fsgr_pma.data.synthetic import background_concept, concept_vocabulary, object_concept, patch_objects

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset directory (a synthetic world)")
    parser.add_argument("--model-config", type=Path, default=Path("configuration/model/tiny.json"))
    parser.add_argument("--output", type=Path, required=True, help="checkpoint file to write (.safetensors)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (10%% warm-up, cosine decay)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 2:
        parser.error("--epochs must be ≥ 1 and --batch-size ≥ 2 (the loss contrasts pairs within a batch)")
    if args.lr <= 0:
        parser.error("--lr must be positive")
    if args.output.suffix != ".safetensors":
        parser.error(f"--output {args.output} must end in .safetensors")
    if not (Path(args.data) / "world.json").is_file():
        parser.error(f"--data {args.data} is not a synthetic world (no world.json): make one with scripts/make_synthetic.py")
    if not args.model_config.is_file():
        parser.error(f"--model-config {args.model_config} does not exist")
    return args


@dataclass
class PhraseTargets:
    """What each image and patch of a split shows, as indices into `phrases` (the world's concept vocabulary).

    Attributes:
        phrases: concept names; the text tower's prompts are the names themselves.
        image_phrases: per image, its objects' and its background's phrase indices.
        patch_phrases: `(N, n_patches)` the phrase of the object each patch shows, or of the image's background.
        patch_colours: `(N, n_patches)` the colour phrase of the object a patch shows, -1 on background (and
            everywhere in the shape world, whose object phrases name the colour already).
        colour_phrases: `(C,)` indices of the colour phrases (empty in the shape world).
        background_phrases: `(P,)` True for the phrases that name a background (a tone, a scene type).
    """

    phrases: list[str]
    image_phrases: list[list[int]]
    patch_phrases: torch.Tensor
    patch_colours: torch.Tensor
    colour_phrases: torch.Tensor
    background_phrases: torch.Tensor

    def select(self, index) -> PhraseTargets:
        """The targets of the images at `index` (a sequence of positions)."""
        index = list(index)
        return PhraseTargets(self.phrases, [self.image_phrases[i] for i in index], self.patch_phrases[index],
                             self.patch_colours[index], self.colour_phrases, self.background_phrases)


def phrase_targets(split, domain: str, config: FsgrPmaConfig) -> PhraseTargets:
    """The phrase targets of a loaded synthetic split: the shape world's "colour shape" and "tone background"
    phrases, or the scene world's category, colour and scene-type names."""
    if domain == scenes.DOMAIN:
        return _scene_targets(split, config)
    if not {"objects", "background"} <= set(split.column_names):
        raise ValueError("pre-training needs a synthetic world (`objects` and `background` columns); make one with "
                         "scripts/make_synthetic.py")
    phrases = concept_vocabulary(domain)
    index = {phrase: i for i, phrase in enumerate(phrases)}
    image_phrases, patch_phrases = [], []
    for objects, background in zip(split["objects"], split["background"]):
        background_id = index[background_concept(background["tone"])]
        object_ids = [index[object_concept(o["colour"], o["shape"])] for o in objects]
        owners = patch_objects(objects, config.image_size, config.grid_size)  # (n,), -1 = background
        patch_phrases.append([object_ids[owner] if owner >= 0 else background_id for owner in owners])
        image_phrases.append(sorted(set(object_ids)) + [background_id])
    patch_phrases = torch.tensor(patch_phrases)
    return PhraseTargets(phrases, image_phrases, patch_phrases, torch.full_like(patch_phrases, -1),
                         torch.zeros(0, dtype=torch.long),
                         torch.tensor([phrase.endswith(" background") for phrase in phrases]))


def _scene_targets(split, config: FsgrPmaConfig) -> PhraseTargets:
    """Scene world: an image's positives are its categories and its scene type; a patch's phrase is the category of
    the object it shows (`scenes.patch_objects`), else the scene type, and an object patch also has its colour."""
    phrases = scenes.concept_vocabulary()
    index = {phrase: i for i, phrase in enumerate(phrases)}
    image_phrases, patch_phrases, patch_colours = [], [], []
    for objects, scene in zip(split["objects"], split["scene"]):
        scene_id = index[scene["type"]]
        owners = scenes.patch_objects(objects, config.image_size, config.grid_size)  # (n,), -1 = background
        patch_phrases.append([index[objects[o]["category"]] if o >= 0 else scene_id for o in owners])
        patch_colours.append([index[objects[o]["colour"]] if o >= 0 else -1 for o in owners])
        image_phrases.append(sorted({index[o["category"]] for o in objects}) + [scene_id])
    return PhraseTargets(phrases, image_phrases, torch.tensor(patch_phrases), torch.tensor(patch_colours),
                         torch.tensor([index[colour] for colour in scenes.COLOURS]),
                         torch.tensor([phrase in scenes.SCENE_TYPES for phrase in phrases]))


class TinyClipPretraining(torch.nn.Module):
    """open_clip's CLIP, with its vision tower also run as the captioner runs it (for the dense embeddings)."""

    def __init__(self, config: FsgrPmaConfig):
        super().__init__()
        self.clip = build_clip(config.clip_config)
        self.tower = FsgrPmaVisionTower(config, visual=self.clip.visual)

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(B, 3, H, W)` → unit image embeddings `(B, d)` (equal to `clip.encode_image`), unit MaskCLIP dense
        embeddings `(B, n, d)` and unit projected output patch tokens `(B, n, d)`."""
        tokens, last_input = self.tower.adapted_blocks(self.tower.frozen_prefix(pixels), with_prompts=False)
        projected = self.clip.visual.ln_post(tokens) @ self.clip.visual.proj  # (B, 1 + n, d)
        dense = self.tower.dense_embeddings(last_input, tokens.shape[1] - 1)  # (B, n, d)
        return F.normalize(projected[:, 0], dim=-1), F.normalize(dense, dim=-1), F.normalize(projected[:, 1:], dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens), dim=-1)  # (L, d)


def pretraining_loss(
    model: TinyClipPretraining,
    pixels: torch.Tensor,
    caption_tokens: torch.Tensor,
    phrase_tokens: torch.Tensor,
    targets: PhraseTargets,
    clip_loss: ClipLoss,
) -> dict[str, torch.Tensor]:
    """The terms for one batch of B images (see the module docstring).

    Args:
        pixels: `(B, 3, H, W)`; caption_tokens: `(B, context)`, one caption per image; phrase_tokens: `(P, context)`
            every phrase of the vocabulary; targets: the batch's own (B images).
    """
    patch_phrases, patch_colours = targets.patch_phrases, targets.patch_colours  # (B, n), (B, n)
    used = sorted({i for ids in targets.image_phrases for i in ids} | set(patch_phrases.unique().tolist())
                  | set(targets.colour_phrases.tolist()))
    position = torch.full((len(phrase_tokens),), -1, dtype=torch.long)
    position[used] = torch.arange(len(used))
    text = model.encode_text(torch.cat([caption_tokens, phrase_tokens[used]]))  # (B + U, d)
    captions, phrases = text[: len(caption_tokens)], text[len(caption_tokens) :]  # (B, d), (U, d)
    image, dense, tokens = model.encode_image(pixels)  # (B, d), (B, n, d), (B, n, d)
    scale = model.clip.logit_scale.exp()

    positives = torch.zeros(len(image), len(used))  # (B, U)
    for row, ids in enumerate(targets.image_phrases):
        positives[row, position[ids]] = 1.0 / len(ids)
    objects = -(positives * F.log_softmax(scale * image @ phrases.T, dim=-1)).sum(1).mean()
    on_background = targets.background_phrases[patch_phrases].flatten()  # (B * n,)
    coloured = (patch_colours >= 0).flatten()  # (B * n,)
    colours = phrases[position[targets.colour_phrases]]  # (C, d)
    colour_index = torch.full((len(phrase_tokens),), -1, dtype=torch.long)
    colour_index[targets.colour_phrases] = torch.arange(len(targets.colour_phrases))
    patches = 0.0
    for embeddings in (dense, tokens):
        logits = (scale * embeddings @ phrases.T).flatten(0, 1)  # (B * n, U)
        losses = F.cross_entropy(logits, position[patch_phrases].flatten(), reduction="none")  # (B * n,)
        patches = patches + sum(losses[part].mean() for part in (on_background, ~on_background) if part.any())
        if coloured.any():  # scene world: an object patch also names its colour among the colours
            colour_logits = scale * embeddings.flatten(0, 1)[coloured] @ colours.T  # (K, C)
            patches = patches + F.cross_entropy(colour_logits, colour_index[patch_colours.flatten()[coloured]])
    return {"captions": clip_loss(image, captions, scale), "objects": objects, "patches": patches}


@torch.no_grad()
def validation_report(
    model: TinyClipPretraining,
    tokenizer,
    pixels: torch.Tensor,
    captions: list[str],
    targets: PhraseTargets,
) -> dict[str, float]:
    """Image→caption top-1 retrieval, and how often an object patch's dense argmax is right.

    Shape world: over every phrase, `phrase` counts the object's own phrase, `shape` and `colour` a phrase that names
    its shape (colour) whatever its other word. Scene world: `category` counts the argmax over every phrase naming
    the object's category, `colour` the argmax over the colour phrases naming its colour. An identical caption text
    counts as a retrieval hit.
    """
    model.eval()
    image, dense, _ = model.encode_image(pixels)  # (N, d), (N, n, d)
    text = model.encode_text(tokenizer(captions))  # (N, d)
    retrieved = (image @ text.T).argmax(1).tolist()
    phrases = model.encode_text(tokenizer(targets.phrases))  # (P, d)
    similarity = dense @ phrases.T  # (N, n, P)
    predicted = similarity.argmax(-1)  # (N, n)
    objects = ~targets.background_phrases[targets.patch_phrases]  # (N, n)
    truth, guess = targets.patch_phrases[objects], predicted[objects]  # (K,), (K,)
    if len(targets.colour_phrases):
        colour_guess = targets.colour_phrases[similarity[..., targets.colour_phrases].argmax(-1)]  # (N, n)
        hits = {"category": truth == guess, "colour": targets.patch_colours[objects] == colour_guess[objects]}
    else:
        words = [phrase.split(" ") for phrase in targets.phrases]
        pairs = list(zip(truth.tolist(), guess.tolist()))
        hits = {"phrase": truth == guess, "shape": torch.tensor([words[t][-1] == words[g][-1] for t, g in pairs]),
                "colour": torch.tensor([words[t][0] == words[g][0] for t, g in pairs])}
    model.train()
    report = {"retrieval_top1": sum(captions[j] == captions[i] for i, j in enumerate(retrieved)) / len(captions)}
    return report | {f"object_patch_{name}": values.float().mean().item() for name, values in hits.items()}


def pixel_tensor(image_processor, images) -> torch.Tensor:
    return image_processor([to_rgb(im) for im in images], return_tensors="pt")["pixel_values"]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    config = FsgrPmaConfig.from_json_file(args.model_config)
    model, tokenizer = TinyClipPretraining(config), clip_tokenizer(config.clip_config)
    image_processor = clip_image_processor(config)

    train = load_caption_split(args.data, "train")
    validation = load_caption_split(args.data, "validation")
    domain = json.loads((Path(args.data) / "world.json").read_text())["domain"]
    targets, validation_targets = phrase_targets(train, domain, config), phrase_targets(validation, domain, config)
    if len(train) < args.batch_size:
        raise ValueError(f"{len(train)} training images: fewer than one batch of {args.batch_size}")
    pixels = pixel_tensor(image_processor, train["image"])  # (N, 3, H, W), preprocessed once
    captions = [tokenizer(list(refs)) for refs in train["captions"]]  # per image (refs, context)
    phrase_tokens = tokenizer(targets.phrases)  # (P, context)

    steps_per_epoch = len(train) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=max(1, total_steps // 10), num_training_steps=total_steps)
    clip_loss = ClipLoss()
    validation_pixels = pixel_tensor(image_processor, validation["image"])  # (N_val, 3, H, W)
    validation_captions = [refs[0] for refs in validation["captions"]]
    model.train()
    start = time.perf_counter()
    for epoch in range(args.epochs):
        rng = np.random.default_rng([args.seed, epoch])
        order = rng.permutation(len(train))
        sums = {}
        for step in tqdm(range(steps_per_epoch), desc=f"epoch {epoch}", leave=False):
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            texts = torch.stack([captions[i][rng.integers(len(captions[i]))] for i in index])  # (B, context)
            losses = pretraining_loss(model, pixels[index], texts, phrase_tokens, targets.select(index), clip_loss)
            sum(losses.values()).backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.item() / steps_per_epoch
        progress = validation_report(model, tokenizer, validation_pixels[:256], validation_captions[:256],
                                     validation_targets.select(range(min(256, len(validation)))))
        logger.info(
            "epoch %d: %s; on 256 validation images %s (%.0f s elapsed)", epoch,
            ", ".join(f"{k} loss {v:.3f}" for k, v in sums.items()),
            ", ".join(f"{k} {v:.3f}" for k, v in progress.items()), time.perf_counter() - start,
        )

    report = validation_report(model, tokenizer, validation_pixels, validation_captions, validation_targets)
    logger.info("validation: %s", ", ".join(f"{k} {v:.3f}" for k, v in report.items()))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().half().contiguous() for name, tensor in model.clip.state_dict().items()}
    save_file(state, str(args.output), metadata={"epochs": str(args.epochs), "seed": str(args.seed)})
    logger.info("saved %s", args.output)
    return report


if __name__ == "__main__":
    main()
