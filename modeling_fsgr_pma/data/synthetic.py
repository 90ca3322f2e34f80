"""The bundled synthetic captioning world: procedural scenes with known objects, and captions that describe them.

Scenes hold 1–4 objects (shape, colour, size, grid position) on a textured background. Each image gets six
differently worded reference captions and its ground-truth object list, with each object's centre. A fixed set of colour–shape pairs is held
out of `train`, `validation` and `test`; every `test_novel` image contains at least one of them (our nocaps).
A second domain (`synthetic-b`: other shapes, colours and backgrounds) serves domain fine-tuning.
Everything is deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Image, Sequence, Value
from PIL import Image as PILImage
from PIL import ImageDraw
from tqdm.auto import tqdm

from modeling_fsgr_pma.data import scenes

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test", "test_novel")
SIZES = {"small": 0.13, "large": 0.21}  # radius as a fraction of the image side
COLUMNS = ("left", "centre", "right")
ROWS = ("top", "middle", "bottom")


@dataclass(frozen=True)
class Domain:
    """Vocabulary and palette of one synthetic domain; the generator code is shared by all domains.

    Attributes:
        name: domain name, the prefix of every image id.
        shapes: shape words; each needs a drawing in `_draw_shape`.
        colours: colour word → RGB.
        textures: background pattern words; each needs a pattern in `_background`.
        tones: background colour word → RGB.
    """

    name: str
    shapes: tuple[str, ...]
    colours: dict[str, tuple[int, int, int]]
    textures: tuple[str, ...]
    tones: dict[str, tuple[int, int, int]]

    def held_out_pairs(self) -> list[tuple[str, str]]:
        """The (colour, shape) pairs of `test_novel`: shape i with colour i + 1, a diagonal of the pair grid.

        One pair per shape, each with a different colour (as long as there are more colours than shapes), so every
        shape and every colour still occurs in training: 7 of 56 pairs (12.5 %) in `synthetic`, 5 of 30 (17 %) in
        `synthetic-b`.
        """
        colours = list(self.colours)
        return [(colours[(i + 1) % len(colours)], shape) for i, shape in enumerate(self.shapes)]


DOMAINS = {
    "synthetic": Domain(
        name="synthetic",
        shapes=("circle", "square", "triangle", "star", "diamond", "cross", "ring"),
        colours={
            "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (240, 220, 30),
            "purple": (140, 40, 180), "orange": (250, 140, 20), "white": (250, 250, 250), "black": (15, 15, 15),
        },
        textures=("stripes", "checks", "noise", "gradient"),
        tones={"grey": (128, 128, 128), "beige": (215, 200, 160), "dark": (55, 60, 70)},
    ),
    "synthetic-b": Domain(
        name="synthetic-b",
        shapes=("hexagon", "heart", "arrow", "moon", "pentagon"),
        colours={
            "pink": (250, 150, 200), "cyan": (40, 220, 230), "brown": (130, 80, 40), "grey": (140, 140, 140),
            "teal": (20, 130, 130), "magenta": (230, 30, 200),
        },
        textures=("dots", "waves", "plain"),
        tones={"navy": (25, 30, 80), "olive": (110, 120, 50), "sand": (225, 210, 170)},
    ),
}

PLURALS = {"cross": "crosses"}
NUMBERS = {2: "two", 3: "three", 4: "four"}
TEXTURE_PHRASES = {"gradient": "a gradient"}  # "with stripes", "with checks", ...; others read as the bare word
DEFAULT_SPLIT_FRACTIONS = {"validation": 0.1, "test": 0.1, "test_novel": 0.1}


def domain_spec(domain: str) -> Domain:
    """The `Domain` named `domain` (`"synthetic"` or `"synthetic-b"`); a `ValueError` for any other name."""
    if domain not in DOMAINS:
        raise ValueError(f"Unknown synthetic domain {domain!r}; choose one of {sorted(DOMAINS)}")
    return DOMAINS[domain]


def object_concept(colour: str, shape: str) -> str:
    """The concept (and pre-training phrase) naming one object: `"red circle"`."""
    return f"{colour} {shape}"


def background_concept(tone: str) -> str:
    """The concept naming a background: `"grey background"`."""
    return f"{tone} background"


def concept_vocabulary(domain: str = "synthetic") -> list[str]:
    """Concept names for the codebook: every colour–shape object (held-out pairs too) and every background tone.

    An object concept names colour and shape together, so that one patch's concept identifies its object; the
    held-out pairs are in the vocabulary although no training image shows them (the text tower composes them).
    """
    spec = domain_spec(domain)
    objects = [object_concept(colour, shape) for shape in spec.shapes for colour in spec.colours]
    return objects + [background_concept(tone) for tone in spec.tones]


# ----------------------------------------------------------------------------------------------------------------
# Scenes
def sample_scene(
    spec: Domain, rng: np.random.Generator, must_include: tuple[str, str] | None, exclude: set[tuple[str, str]]
) -> dict:
    """1–4 objects in distinct cells of a 3×3 grid, a texture and a tone.

    Args:
        spec: the domain to draw from.
        rng: the image's own generator.
        must_include: a (colour, shape) pair given to one object at a random place in the list, or None.
        exclude: (colour, shape) pairs that never occur (apart from `must_include`).

    Returns:
        `{"objects": [{"shape", "colour", "size", "column", "row", "x", "y"}, ...], "texture": str, "tone": str}`,
        with the centre (x, y) as fractions of the image side: the cell's centre jittered by up to 12 % of a cell.
    """
    allowed = [(c, s) for c in spec.colours for s in spec.shapes if (c, s) not in exclude]
    count = int(rng.integers(1, 5))
    cells = rng.choice(9, size=count, replace=False)
    forced = int(rng.integers(count)) if must_include else -1
    objects = []
    for i, cell in enumerate(cells):
        colour, shape = must_include if i == forced else allowed[int(rng.integers(len(allowed)))]
        size = "large" if rng.random() < 0.5 else "small"
        column, row = int(cell % 3), int(cell // 3)
        jitter = rng.uniform(-0.12, 0.12, size=2)
        x, y = (column + 0.5 + jitter[0]) / 3, (row + 0.5 + jitter[1]) / 3
        objects.append({"shape": shape, "colour": colour, "size": size, "column": column, "row": row, "x": x, "y": y})
    return {
        "objects": objects,
        "texture": spec.textures[int(rng.integers(len(spec.textures)))],
        "tone": list(spec.tones)[int(rng.integers(len(spec.tones)))],
    }


def render_scene(scene: dict, spec: Domain, image_size: int, rng: np.random.Generator) -> PILImage.Image:
    """Draw at 2× and downsample (anti-aliasing)."""
    side = 2 * image_size
    canvas = PILImage.fromarray(_background(scene["texture"], spec.tones[scene["tone"]], side, rng))
    for obj in scene["objects"]:
        canvas.paste(spec.colours[obj["colour"]], mask=_object_mask(obj, side))
    return canvas.resize((image_size, image_size), PILImage.LANCZOS)


def _object_mask(obj: dict, side: int) -> PILImage.Image:
    """The object's silhouette on a `side`-pixel canvas, 255 inside (mode L)."""
    mask = PILImage.new("L", (side, side), 0)
    _draw_shape(ImageDraw.Draw(mask), obj["shape"], (obj["x"] * side, obj["y"] * side), SIZES[obj["size"]] * side)
    return mask


def patch_objects(objects: list[dict], image_size: int, grid_size: int, min_cover: float = 0.25) -> np.ndarray:
    """Which object each patch of a `grid_size`² grid shows: `(grid_size**2,)` object indices, -1 for background.

    A patch shows the object that covers most of its pixels, when that object covers at least `min_cover` of them
    (`scenes.patch_owners`); later objects are drawn over earlier ones, as in `render_scene`. `objects` need their
    centres (`x`, `y`).
    """
    owner = np.full((image_size, image_size), -1, dtype=np.int64)
    for index, obj in enumerate(objects):
        owner[np.asarray(_object_mask(obj, image_size)) > 127] = index
    return scenes.patch_owners(owner, len(objects), grid_size, min_cover)


def _background(texture: str, tone: tuple[int, int, int], side: int, rng: np.random.Generator) -> np.ndarray:
    """A `(side, side, 3)` uint8 background: the tone modulated by ±15 % with the texture's pattern."""
    base = np.array(tone, dtype=np.float32)
    y, x = np.mgrid[0:side, 0:side] / side
    period = rng.uniform(0.08, 0.2)
    if texture == "stripes":
        pattern = ((x + y * rng.uniform(-1, 1)) / period % 1 < 0.5).astype(np.float32)
    elif texture == "checks":
        pattern = ((x // period + y // period) % 2).astype(np.float32)
    elif texture == "noise":
        pattern = rng.random((side, side)).astype(np.float32)
    elif texture == "gradient":
        pattern = x if rng.random() < 0.5 else y
    elif texture == "dots":
        pattern = ((((x / period) % 1 - 0.5) ** 2 + ((y / period) % 1 - 0.5) ** 2) < 0.06).astype(np.float32)
    elif texture == "waves":
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * (y + 0.05 * np.sin(2 * np.pi * x / period)) / period)
    elif texture == "plain":
        pattern = np.zeros((side, side), dtype=np.float32)
    else:
        raise ValueError(f"No pattern for texture {texture!r}")
    image = base[None, None] * (0.85 + 0.3 * pattern[..., None])
    return np.clip(image, 0, 255).astype(np.uint8)


def _regular_polygon(
    centre: tuple[float, float], radius: float, sides: int, rotation: float = -np.pi / 2, inner: float | None = None
) -> list[tuple[float, float]]:
    """Vertices of a regular polygon, or of a star when `inner` (the inner radius as a fraction) is given."""
    points = []
    steps = sides * (2 if inner else 1)
    for k in range(steps):
        r = radius if (inner is None or k % 2 == 0) else inner * radius
        angle = rotation + 2 * np.pi * k / steps
        points.append((centre[0] + r * np.cos(angle), centre[1] + r * np.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], r: float) -> None:
    """Draw `shape` with radius `r` into a mask (255 = shape; holes are drawn back with 0)."""
    cx, cy = centre
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=255)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(centre, r, 3), fill=255)
    elif shape == "star":
        draw.polygon(_regular_polygon(centre, r, 5, inner=0.45), fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=255)
    elif shape == "cross":
        draw.rectangle((cx - r, cy - 0.3 * r, cx + r, cy + 0.3 * r), fill=255)
        draw.rectangle((cx - 0.3 * r, cy - r, cx + 0.3 * r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(centre, r, 6, rotation=0), fill=255)
    elif shape == "pentagon":
        draw.polygon(_regular_polygon(centre, r, 5), fill=255)
    elif shape == "heart":
        draw.ellipse((cx - r, cy - 0.8 * r, cx, cy + 0.2 * r), fill=255)
        draw.ellipse((cx, cy - 0.8 * r, cx + r, cy + 0.2 * r), fill=255)
        draw.polygon([(cx - 0.97 * r, cy - 0.15 * r), (cx + 0.97 * r, cy - 0.15 * r), (cx, cy + r)], fill=255)
    elif shape == "arrow":
        draw.rectangle((cx - r, cy - 0.25 * r, cx + 0.1 * r, cy + 0.25 * r), fill=255)
        draw.polygon([(cx + 0.1 * r, cy - 0.7 * r), (cx + r, cy), (cx + 0.1 * r, cy + 0.7 * r)], fill=255)
    elif shape == "moon":
        draw.ellipse(box, fill=255)
        draw.ellipse((cx - 0.4 * r, cy - 1.1 * r, cx + 1.4 * r, cy + 0.7 * r), fill=0)
    else:
        raise ValueError(f"No drawing for shape {shape!r}")


# ----------------------------------------------------------------------------------------------------------------
# Captions
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def _position(obj: dict) -> str:
    column, row = COLUMNS[obj["column"]], ROWS[obj["row"]]
    if column == "centre" and row == "middle":
        return "in the centre"
    if row == "middle":
        return f"on the {column}"
    if column == "centre":
        return f"at the {row}"
    return f"in the {row} {column}"


def _relation(first: dict, second: dict) -> str:
    """Where `first` is relative to `second` (they are in different cells)."""
    if first["row"] == second["row"] and abs(first["column"] - second["column"]) == 1:
        return "next to"
    if first["column"] != second["column"]:
        return "to the left of" if first["column"] < second["column"] else "to the right of"
    return "above" if first["row"] < second["row"] else "below"


def _groups(objects: list[dict]) -> list[tuple[str, str, int]]:
    """(colour, shape, count) in order of first appearance."""
    counts: dict[tuple[str, str], int] = {}
    for obj in objects:
        counts[(obj["colour"], obj["shape"])] = counts.get((obj["colour"], obj["shape"]), 0) + 1
    return [(colour, shape, n) for (colour, shape), n in counts.items()]


def _phrase(colour: str, shape: str, count: int) -> str:
    if count == 1:
        return f"{_article(colour)} {colour} {shape}"
    return f"{NUMBERS[count]} {colour} {_plural(shape)}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _background_phrase(texture: str, tone: str) -> str:
    if texture == "plain":
        return f"a plain {tone} background"
    return f"{_article(tone)} {tone} background with {TEXTURE_PHRASES.get(texture, texture)}"


def make_captions(scene: dict, rng: np.random.Generator) -> list[str]:
    """Six differently worded lowercase captions (no final period), each naming every object's colour and shape.

    Wordings: a plain listing with counts ("two blue squares"), "there is ... on a grey background", positions
    ("a red circle on the left"), sizes ("an image showing a large red circle"), the background texture, and a
    relation between the first two objects ("to the left of", "above", "next to") or, for a single object,
    "a circle that is red". The order is shuffled with `rng`.
    """
    objects = scene["objects"]
    listing = _join([_phrase(*group) for group in _groups(objects)])
    first = objects[0]
    sized = [f"{_article(o['size'])} {o['size']} {o['colour']} {o['shape']}" for o in objects]
    located = [f"{_phrase(o['colour'], o['shape'], 1)} {_position(o)}" for o in objects]
    if len(objects) == 1:
        related = f"{_article(first['shape'])} {first['shape']} that is {first['colour']} {_position(first)}"
    else:
        second = objects[1]
        rest = [_phrase(*group) for group in _groups(objects[2:])]
        tail = f" with {_join(rest)}" if rest else ""
        pair = f"{_phrase(first['colour'], first['shape'], 1)} {_relation(first, second)}"
        related = f"{pair} {_phrase(second['colour'], second['shape'], 1)}{tail}"
    captions = [
        listing,
        f"there is {listing} on {_article(scene['tone'])} {scene['tone']} background",
        _join(located),
        f"an image showing {_join(sized)}",
        f"{listing} on {_background_phrase(scene['texture'], scene['tone'])}",
        related,
    ]
    return [captions[i] for i in rng.permutation(len(captions))]


# ----------------------------------------------------------------------------------------------------------------
# The world on disk
FEATURES = Features(
    {
        "image_id": Value("string"),
        "image": Image(),
        "captions": Sequence(Value("string")),
        "objects": [
            {"shape": Value("string"), "colour": Value("string"), "size": Value("string"), "x": Value("float32"),
             "y": Value("float32")}
        ],
        "background": {"tone": Value("string"), "texture": Value("string")},
    }
)


def split_sizes(num_images: int, split_fractions: dict[str, float] | None = None) -> dict[str, int]:
    """Images per split: `num_images` for `train`, and `round(fraction × num_images)` (at least 1) for the others.

    Args:
        num_images: training images.
        split_fractions: fraction of `num_images` for each of `validation`, `test` and `test_novel`; defaults to
            0.1 each (`DEFAULT_SPLIT_FRACTIONS`).
    """
    fractions = DEFAULT_SPLIT_FRACTIONS if split_fractions is None else split_fractions
    if set(fractions) != set(SPLITS[1:]) or any(f <= 0 for f in fractions.values()):
        raise ValueError(f"split_fractions needs a positive fraction for each of {SPLITS[1:]}, got {fractions}")
    return {"train": num_images} | {split: max(1, round(fractions[split] * num_images)) for split in SPLITS[1:]}


def sample_example(spec: Domain, split: str, index: int, seed: int) -> tuple[dict, np.random.Generator]:
    """The scene of image `index` of `split` and its generator, seeded by (seed, split, index), for rendering and
    captioning next. `test_novel` scenes contain one held-out pair (and may contain more); others never do."""
    held_out = spec.held_out_pairs()
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    if split == "test_novel":
        return sample_scene(spec, rng, must_include=held_out[int(rng.integers(len(held_out)))], exclude=set()), rng
    return sample_scene(spec, rng, must_include=None, exclude=set(held_out)), rng


def generate_split(split: str, count: int, seed: int, image_size: int, spec: Domain) -> Dataset:
    """Render `count` images of `split`; image i draws from its own generator seeded by (seed, split, i).

    `test_novel` images each contain one held-out pair (and may contain more); the other splits never do.
    """
    records = {"image_id": [], "image": [], "captions": [], "objects": [], "background": []}
    for i in tqdm(range(count), desc=f"rendering {split}", disable=count < 500, leave=False):
        scene, rng = sample_example(spec, split, i, seed)
        buffer = io.BytesIO()
        render_scene(scene, spec, image_size, rng).save(buffer, format="PNG")
        records["image_id"].append(f"{spec.name}-{split}-{seed}-{i:06d}")
        records["image"].append({"bytes": buffer.getvalue(), "path": None})
        records["captions"].append(make_captions(scene, rng))
        records["objects"].append([{k: o[k] for k in ("shape", "colour", "size", "x", "y")} for o in scene["objects"]])
        records["background"].append({"tone": scene["tone"], "texture": scene["texture"]})
    return Dataset.from_dict(records, features=FEATURES)


def generate_world(
    output_dir: str | Path,
    num_images: int,
    seed: int,
    image_size: int = 64,
    domain: str = "synthetic",
    split_fractions: dict[str, float] | None = None,
) -> dict:
    """Write one synthetic world: `output_dir/data/{split}-00000-of-00001.parquet` per split and `world.json`.

    Args:
        output_dir: created if missing; existing split files are overwritten.
        num_images: training images; see `split_sizes` for the other splits.
        seed: the same seed (and arguments) gives the same files.
        image_size: side of the square images in pixels.
        domain: `"synthetic"` or `"synthetic-b"`.
        split_fractions: see `split_sizes`.

    Returns:
        The content of `world.json`: domain, seed, image size, counts per split, the vocabulary (shapes, colours,
        sizes, textures, tones) and the held-out (colour, shape) pairs.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    spec = domain_spec(domain)
    output_dir = Path(output_dir)
    (output_dir / "data").mkdir(parents=True, exist_ok=True)
    counts = split_sizes(num_images, split_fractions)
    for split, count in counts.items():
        path = output_dir / "data" / f"{split}-00000-of-00001.parquet"
        generate_split(split, count, seed, image_size, spec).to_parquet(str(path))
        logger.info("wrote %d %s images to %s", count, split, path)
    world = {
        "domain": domain,
        "seed": seed,
        "image_size": image_size,
        "counts": counts,
        "shapes": list(spec.shapes),
        "colours": list(spec.colours),
        "sizes": list(SIZES),
        "textures": list(spec.textures),
        "tones": list(spec.tones),
        "held_out_pairs": [list(pair) for pair in spec.held_out_pairs()],
    }
    (output_dir / "world.json").write_text(json.dumps(world, indent=2))
    return world


# ----------------------------------------------------------------------------------------------------------------
# The world with COCO's files: Karpathy's dataset_coco.json, JPEG folders, the test servers' image info
COCO_RENDER_SIDE = 96  # scenes are drawn this small and upscaled: rendering at 640×480 would dominate the time
# Sensor-like grain, so that the JPEGs are as large (about 140 KiB at 640×480, COCO's average is about 160 KiB) and
# as slow to decode as photographs; an upscaled drawing alone compresses to about 20 KiB.
COCO_GRAIN = 30
COCO_FRACTIONS = {"restval": 0.27, "val": 0.1, "test": 0.1, "test2014": 0.1, "nocaps_val": 0.1, "nocaps_test": 0.1}


@dataclass(frozen=True)
class _CocoImage:
    """One JPEG to write: where it goes, which synthetic scene it shows, and its orientation."""

    path: str  # relative to the output directory
    scene_split: str  # the synthetic split whose image sequence it is drawn from
    scene_index: int
    portrait: bool


def coco_split_sizes(num_images: int) -> dict[str, int]:
    """Images per part of the COCO-shaped world: `num_images` Karpathy training images (`train` + `restval`, split
    73:27 as in COCO's 82,783 + 30,504), and a tenth of that (at least 2) for each evaluation part."""
    if num_images < 2:
        raise ValueError(f"num_images must be at least 2 (train and restval), got {num_images}")
    sizes = {name: max(2, round(fraction * num_images)) for name, fraction in COCO_FRACTIONS.items()}
    sizes["restval"] = min(sizes["restval"], num_images - 1)
    return {"train": num_images - sizes["restval"], **sizes}


def render_coco_image(
    scene_image: PILImage.Image, fill: tuple[int, int, int], short_side: int, portrait: bool, rng: np.random.Generator
):
    """A scene drawn at `COCO_RENDER_SIDE`, upscaled to a square of `short_side` and centred on a 4:3 canvas of
    `fill` (the background's tone; landscape, or portrait), with grain: a CLIP centre crop sees exactly the square
    scene."""
    scene_image = scene_image.resize((short_side, short_side), PILImage.BILINEAR)
    long_side = round(short_side * 4 / 3)
    size = (short_side, long_side) if portrait else (long_side, short_side)
    canvas = PILImage.new("RGB", size, fill)
    canvas.paste(scene_image, ((size[0] - short_side) // 2, (size[1] - short_side) // 2))
    grain = _grain(long_side)  # (2L, 2L, 3); a random window of it per image
    top, left = (int(offset) for offset in rng.integers(0, long_side, size=2))
    pixels = np.asarray(canvas, dtype=np.int16) + grain[top : top + size[1], left : left + size[0]]  # (H, W, 3)
    return PILImage.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@lru_cache(maxsize=4)
def _grain(long_side: int) -> np.ndarray:
    """Uniform noise in ±`COCO_GRAIN`, `(2L, 2L, 3)` int16, the same in every process."""
    rng = np.random.default_rng([COCO_GRAIN, long_side])
    return rng.integers(-COCO_GRAIN, COCO_GRAIN + 1, size=(2 * long_side, 2 * long_side, 3), dtype=np.int16)


def _write_coco_images(
    images: list[_CocoImage], output_dir: str, seed: int, domain: str, short_side: int
) -> list[tuple[list[str], list[dict], tuple[int, int]]]:
    """Render and save a chunk of JPEGs (a worker process's job); returns captions, objects and size per image."""
    written = []
    for image in images:
        if domain == scenes.DOMAIN:
            square, captions, record = scenes.render_example(
                image.scene_split, image.scene_index, seed, COCO_RENDER_SIDE
            )
            objects, rng = record["objects"], np.random.default_rng([seed, image.scene_index, 4])
            fill = square.getpixel((0, square.height - 1))  # the ground's colour
        else:
            spec = domain_spec(domain)
            scene, rng = sample_example(spec, image.scene_split, image.scene_index, seed)
            square, fill = render_scene(scene, spec, COCO_RENDER_SIDE, rng), spec.tones[scene["tone"]]
            objects = [{k: o[k] for k in ("shape", "colour", "size")} for o in scene["objects"]]
            captions = make_captions(scene, rng)
        picture = render_coco_image(square, fill, short_side, image.portrait, rng)
        picture.save(Path(output_dir) / image.path, format="JPEG", quality=90)
        written.append((captions, objects, picture.size))
    return written


def generate_coco_world(
    output_dir: str | Path,
    num_images: int,
    seed: int,
    image_size: int = 480,
    domain: str = "synthetic",
    num_workers: int | None = None,
) -> dict:
    """Write the synthetic world in the files COCO users have: JPEGs at COCO-like sizes and the annotation files.

    Layout (under `output_dir`): `dataset_coco.json` (Karpathy's format: `images[]` with `filepath`, `filename`,
    `cocoid`, `split` in train/restval/val/test, `sentences[].raw`), `train2014/` (the `train` images) and `val2014/`
    (restval, val, test) named `COCO_{folder}_{cocoid:012d}.jpg`, with `annotations/captions_val2014.json` (COCO's
    format: the val2014 images and their captions); the COCO test server's `test2014/` with
    `annotations/image_info_test2014.json`; nocaps' `nocaps/validation/` and `nocaps/test/` with
    `nocaps/nocaps_val_4500_captions.json` (captions, and a `domain` per image: in-domain scenes as in training,
    out-domain ones with a held-out colour–shape pair) and `nocaps/nocaps_test_image_info.json` (no captions); and
    `world.json`. Images are 4:3 with `image_size` as the short side (640×480 by default), every fourth portrait.

    Args:
        output_dir: created if missing; existing files are overwritten.
        num_images: Karpathy training images (train + restval); see `coco_split_sizes` for the other parts.
        seed: the same seed (and arguments) gives the same files, whatever `num_workers`.
        image_size: short side of the images in pixels.
        domain: `"synthetic"`, `"synthetic-b"` or `"scenes"` (`modeling_fsgr_pma.data.scenes`, whose nocaps
            part has in-domain, near-domain and out-domain images).
        num_workers: processes rendering JPEGs (default: the CPUs this process may use).

    Returns:
        The content of `world.json`: domain, seed, image size, counts per part, vocabulary, held-out pairs.
    """
    spec = None if domain == scenes.DOMAIN else domain_spec(domain)
    sizes = coco_split_sizes(num_images)
    output_dir = Path(output_dir)
    for folder in ("train2014", "val2014", "test2014", "annotations", "nocaps/validation", "nocaps/test"):
        (output_dir / folder).mkdir(parents=True, exist_ok=True)

    # Which scene every file shows: each part takes its own stretch of a synthetic split's image sequence.
    karpathy, servers = [], {"test2014": [], "nocaps_val": [], "nocaps_test": []}
    offsets = dict.fromkeys(scenes.SPLITS if spec is None else SPLITS, 0)
    # nocaps' domains: in-domain scenes as in training; near-domain (scene world) and out-domain scenes held out
    nocaps_domains = (
        [("test", "in-domain"), ("test_novel", "near-domain"), ("test_out_domain", "out-domain")] if spec is None
        else [("test", "in-domain"), ("test_novel", "out-domain")]
    )

    def take(scene_split: str) -> int:
        offsets[scene_split] += 1
        return offsets[scene_split] - 1

    cocoid = 0
    for part, scene_split, folder in (
        ("train", "train", "train2014"), ("restval", "train", "val2014"), ("val", "validation", "val2014"),
        ("test", "test", "val2014"),
    ):  # fmt: skip
        for _ in range(sizes[part]):
            cocoid += 1
            name = f"COCO_{folder}_{cocoid:012d}.jpg"
            image = _CocoImage(f"{folder}/{name}", scene_split, take(scene_split), portrait=cocoid % 4 == 0)
            karpathy.append((part, folder, name, cocoid, image))
    for _ in range(sizes["test2014"]):
        cocoid += 1
        name = f"COCO_test2014_{cocoid:012d}.jpg"
        image = _CocoImage(f"test2014/{name}", "test", take("test"), portrait=cocoid % 4 == 0)
        servers["test2014"].append((cocoid, name, image))
    for part, folder in (("nocaps_val", "validation"), ("nocaps_test", "test")):
        for i in range(sizes[part]):
            scene_split = nocaps_domains[i % len(nocaps_domains)][0]  # the domains take turns
            name = f"{hashlib.sha256(f'{seed}-{part}-{i}'.encode()).hexdigest()[:16]}.jpg"
            image = _CocoImage(f"nocaps/{folder}/{name}", scene_split, take(scene_split), portrait=False)
            servers[part].append((i, name, image))

    jobs = [entry[-1] for entry in karpathy] + [entry[-1] for part in servers.values() for entry in part]
    written = _render_parallel(jobs, output_dir, seed, domain, image_size, num_workers)
    results = dict(zip((job.path for job in jobs), written, strict=True))

    images, sentence_id = [], 0
    for imgid, (part, folder, name, cocoid, job) in enumerate(karpathy):
        captions = results[job.path][0]
        sentences = [
            {"tokens": caption.split(), "raw": caption, "imgid": imgid, "sentid": sentence_id + k}
            for k, caption in enumerate(captions)
        ]
        images.append({
            "filepath": folder, "filename": name, "imgid": imgid, "split": part, "cocoid": cocoid,
            "sentids": [s["sentid"] for s in sentences], "sentences": sentences,
        })  # fmt: skip
        sentence_id += len(sentences)
    (output_dir / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))

    def image_info(entries: list, domains: bool) -> list[dict]:
        info = []
        for image_id, name, job in entries:
            width, height = results[job.path][2]
            record = {"id": image_id, "file_name": name, "width": width, "height": height}
            if domains:
                record["domain"] = dict(nocaps_domains)[job.scene_split]
            info.append(record)
        return info

    (output_dir / "annotations" / "image_info_test2014.json").write_text(
        json.dumps({"images": image_info(servers["test2014"], domains=False), "categories": []})
    )
    val2014 = [(cocoid, name, job) for _, folder, name, cocoid, job in karpathy if folder == "val2014"]
    captions_val2014 = [
        {"image_id": cocoid, "id": 10 * cocoid + k, "caption": caption}
        for cocoid, _, job in val2014
        for k, caption in enumerate(results[job.path][0])
    ]
    (output_dir / "annotations" / "captions_val2014.json").write_text(
        json.dumps({"images": image_info(val2014, domains=False), "annotations": captions_val2014})
    )
    annotations = [
        {"image_id": image_id, "id": 10 * image_id + k, "caption": caption}
        for image_id, _, job in servers["nocaps_val"]
        for k, caption in enumerate(results[job.path][0])
    ]
    (output_dir / "nocaps" / "nocaps_val_4500_captions.json").write_text(
        json.dumps({"images": image_info(servers["nocaps_val"], domains=True), "annotations": annotations})
    )
    (output_dir / "nocaps" / "nocaps_test_image_info.json").write_text(
        json.dumps({"images": image_info(servers["nocaps_test"], domains=True)})
    )
    if spec is None:
        world = {"layout": "coco-karpathy"} | scenes.world_info(seed, image_size, sizes)
    else:
        world = {
            "layout": "coco-karpathy", "domain": domain, "seed": seed, "image_size": image_size, "counts": sizes,
            "shapes": list(spec.shapes), "colours": list(spec.colours), "sizes": list(SIZES),
            "textures": list(spec.textures), "tones": list(spec.tones),
            "held_out_pairs": [list(pair) for pair in spec.held_out_pairs()],
        }  # fmt: skip
    (output_dir / "world.json").write_text(json.dumps(world, indent=2))
    logger.info("wrote %d JPEGs and the COCO annotation files to %s", len(jobs), output_dir)
    return world


def _render_parallel(
    jobs: list[_CocoImage], output_dir: Path, seed: int, domain: str, image_size: int, num_workers: int | None
) -> list[tuple[list[str], list[dict], tuple[int, int]]]:
    """`_write_coco_images` over chunks of `jobs` in worker processes, results in the order of `jobs`."""
    workers = num_workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    chunks = [jobs[start : start + 256] for start in range(0, len(jobs), 256)]
    written = []
    with ProcessPoolExecutor(workers) as pool, tqdm(
        total=len(jobs), desc="rendering JPEGs", leave=False, disable=len(jobs) < 500
    ) as progress:
        render = partial(
            _write_coco_images, output_dir=str(output_dir), seed=seed, domain=domain, short_side=image_size
        )
        for chunk in pool.map(render, chunks):
            written += chunk
            progress.update(len(chunk))
    return written


# ----------------------------------------------------------------------------------------------------------------
# Hallucination (CHAIR-style)
def mentioned_objects(caption: str, domain: str | None = None) -> set[tuple[str | None, str]]:
    """The objects a caption mentions: (colour or None, shape) for its shape words, singular or plural.

    A colour belongs to a shape when it is one of the two words before it ("a red circle", "two large red
    circles") or follows "that is" ("a circle that is red"); otherwise the colour is None.

    Args:
        caption: any text; matched on lowercase words.
        domain: whose vocabulary to use; None uses every domain's.
    """
    specs = [domain_spec(domain)] if domain else list(DOMAINS.values())
    shapes = {word: shape for spec in specs for shape in spec.shapes for word in (shape, _plural(shape))}
    colours = {colour for spec in specs for colour in spec.colours}
    words = re.findall(r"[a-z]+", caption.lower())
    mentions = set()
    for i, word in enumerate(words):
        if word not in shapes:
            continue
        before = [w for w in words[max(0, i - 2) : i] if w in colours]
        after = words[i + 1 : i + 4]
        if before:
            colour = before[-1]
        elif after[:2] == ["that", "is"] and len(after) == 3 and after[2] in colours:
            colour = after[2]
        else:
            colour = None
        mentions.add((colour, shapes[word]))
    return mentions


MENTION_KINDS = ("correct", "wrong_shape", "wrong_colour", "wrong_binding")


def classify_mention(colour: str | None, shape: str, objects: list[dict]) -> str:
    """What a mention (colour or None, shape) is against the image's objects, one of `MENTION_KINDS`.

    `wrong_shape`: no object has that shape. `wrong_colour`: the shape is there, but no object of the image has that
    colour. `wrong_binding`: the shape and the colour are both in the image, never on one object ("a red square"
    with a blue square and a red circle). A mention without a colour is `correct` when the shape is there.
    """
    present = {(o["colour"], o["shape"]) for o in objects}
    if shape not in {s for _, s in present}:
        return "wrong_shape"
    if colour is None or (colour, shape) in present:
        return "correct"
    return "wrong_binding" if colour in {c for c, _ in present} else "wrong_colour"


def hallucination_breakdown(
    predictions: dict[str, str], objects: dict[str, list[dict]], domain: str | None = None
) -> dict[str, float | int | None]:
    """CHAIR_i-style hallucination, pooled over the predictions, and its split by kind of mistake.

    For each caption, take its distinct mentions from `mentioned_objects` and classify each (`classify_mention`).
    Returns `hallucination_rate` (mentions not `correct` ÷ all mentions), `hallucination_wrong_shape`,
    `..._wrong_colour` and `..._wrong_binding` (each kind ÷ all mentions; the three add up to the rate) and
    `mentions`; the rates are None when no caption mentions an object (a captioner that names no known shape is
    not thereby accurate).

    Args:
        predictions: image id → predicted caption.
        objects: image id → ground-truth objects (`{"shape", "colour", ...}` dicts); must cover every prediction.
        domain: vocabulary used to parse the captions (None: every domain's).
    """
    counts = dict.fromkeys(MENTION_KINDS, 0)
    for image_id, caption in predictions.items():
        for colour, shape in mentioned_objects(caption, domain):
            counts[classify_mention(colour, shape, objects[image_id])] += 1
    total = sum(counts.values())
    share = (lambda n: n / total) if total else (lambda n: None)  # noqa: E731
    result = {"hallucination_rate": share(total - counts["correct"])}
    result |= {f"hallucination_{kind}": share(counts[kind]) for kind in MENTION_KINDS[1:]}
    return result | {"mentions": total}


def hallucination_rate(
    predictions: dict[str, str], objects: dict[str, list[dict]], domain: str | None = None
) -> float | None:
    """The share of mentioned objects that are not in the image (`hallucination_breakdown`'s rate); None without any."""
    return hallucination_breakdown(predictions, objects, domain)["hallucination_rate"]
