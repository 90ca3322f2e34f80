"""The bundled synthetic captioning world: procedural scenes with known objects, and captions that describe them.

Scenes hold 1–4 objects (shape, colour, size, grid position) on a textured background. Each image gets five
differently worded reference captions and its ground-truth object list. A fixed set of colour–shape pairs is held
out of `train`, `validation` and `test`; every `test_novel` image contains at least one of them (our nocaps).
A second domain (`synthetic-b`: other shapes, colours and backgrounds) serves domain fine-tuning.
Everything is deterministic for a seed. Training-side code: the remote-code model never imports it.
"""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Image, Sequence, Value
from PIL import Image as PILImage
from PIL import ImageDraw
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test", "test_novel")
SIZES = {"small": 0.13, "large": 0.21}  # radius as a fraction of the image side
COLUMNS = ("left", "centre", "right")
ROWS = ("top", "middle", "bottom")


@dataclass(frozen=True)
class Domain:
    """Vocabulary and palette of one synthetic domain."""

    name: str
    shapes: tuple[str, ...]
    colours: dict[str, tuple[int, int, int]]
    textures: tuple[str, ...]
    tones: dict[str, tuple[int, int, int]]  # background colours

    def held_out_pairs(self) -> list[tuple[str, str]]:
        """One (colour, shape) pair per shape, spread over the colours: about 1/len(colours) of all pairs."""
        colours = list(self.colours)
        return [(colours[(3 * i + 1) % len(colours)], shape) for i, shape in enumerate(self.shapes)]


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


def domain_spec(domain: str) -> Domain:
    if domain not in DOMAINS:
        raise ValueError(f"Unknown synthetic domain {domain!r}; choose one of {sorted(DOMAINS)}")
    return DOMAINS[domain]


def concept_vocabulary(domain: str = "synthetic") -> list[str]:
    """Concept names for the codebook: shapes, colours, sizes, positions, textures and background tones."""
    spec = domain_spec(domain)
    words = [*spec.shapes, *spec.colours, *SIZES, *COLUMNS, *ROWS, *spec.textures, *spec.tones, "background"]
    return list(dict.fromkeys(words))


# ----------------------------------------------------------------------------------------------------------------
# Scenes
def sample_scene(spec: Domain, rng: np.random.Generator, must_include: tuple[str, str] | None, exclude: set) -> dict:
    """Objects in distinct cells of a 3×3 grid, a texture and a tone. Pairs in `exclude` never occur."""
    allowed = [(c, s) for c in spec.colours for s in spec.shapes if (c, s) not in exclude]
    count = int(rng.integers(1, 5))
    cells = rng.choice(9, size=count, replace=False)
    objects = []
    for i, cell in enumerate(cells):
        colour, shape = must_include if (i == 0 and must_include) else allowed[int(rng.integers(len(allowed)))]
        size = "large" if rng.random() < 0.5 else "small"
        objects.append({"shape": shape, "colour": colour, "size": size, "column": int(cell % 3), "row": int(cell // 3)})
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
        cell = side / 3
        jitter = rng.uniform(-0.12, 0.12, size=2) * cell
        centre = ((obj["column"] + 0.5) * cell + jitter[0], (obj["row"] + 0.5) * cell + jitter[1])
        radius = SIZES[obj["size"]] * side
        mask = PILImage.new("L", (side, side), 0)
        _draw_shape(ImageDraw.Draw(mask), obj["shape"], centre, radius)
        canvas.paste(spec.colours[obj["colour"]], mask=mask)
    return canvas.resize((image_size, image_size), PILImage.LANCZOS)


def _background(texture: str, tone: tuple[int, int, int], side: int, rng: np.random.Generator) -> np.ndarray:
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
    else:  # plain
        pattern = np.zeros((side, side), dtype=np.float32)
    image = base[None, None] * (0.85 + 0.3 * pattern[..., None])
    return np.clip(image, 0, 255).astype(np.uint8)


def _regular_polygon(centre, radius, sides, rotation=-np.pi / 2, inner=None):
    points = []
    steps = sides * (2 if inner else 1)
    for k in range(steps):
        r = radius if (inner is None or k % 2 == 0) else inner * radius
        angle = rotation + 2 * np.pi * k / steps
        points.append((centre[0] + r * np.cos(angle), centre[1] + r * np.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre, r: float) -> None:
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


def make_captions(scene: dict, rng: np.random.Generator) -> list[str]:
    """Five differently worded captions that mention every object's colour and shape."""
    objects, texture, tone = scene["objects"], scene["texture"], scene["tone"]
    groups = _groups(objects)
    listing = _join([_phrase(*g) for g in groups])
    first = objects[0]
    sized = [f"{_article(o['size'])} {o['size']} {o['colour']} {o['shape']}" for o in objects]
    located = [f"{_phrase(o['colour'], o['shape'], 1)} {_position(o)}" for o in objects]
    captions = [
        listing,
        f"there is {listing} on {_article(tone)} {tone} background",
        _join(located),
        f"an image showing {_join(sized)}",
        f"{listing} on {_article(texture)} {texture} {tone} background",
    ]
    if len(objects) >= 2:
        second = objects[1]
        if first["column"] != second["column"]:
            relation = "to the left of" if first["column"] < second["column"] else "to the right of"
        else:
            relation = "above" if first["row"] < second["row"] else "below"
        rest = [_phrase(*g) for g in _groups(objects[2:])]
        tail = f" with {_join(rest)}" if rest else ""
        captions[2] = f"{_phrase(first['colour'], first['shape'], 1)} {relation} {_phrase(second['colour'], second['shape'], 1)}{tail}"
    else:
        captions[3] = f"{_article(first['shape'])} {first['shape']} that is {first['colour']} {_position(first)}"
    order = rng.permutation(len(captions))
    return [captions[i] for i in order]


# ----------------------------------------------------------------------------------------------------------------
# The world on disk
def split_sizes(num_images: int) -> dict[str, int]:
    """`num_images` training images; validation, test and test_novel get a tenth each (at least one)."""
    held = max(1, num_images // 10)
    return {"train": num_images, "validation": held, "test": held, "test_novel": held}


def generate_split(split: str, count: int, seed: int, image_size: int, spec: Domain) -> Dataset:
    held_out = set(spec.held_out_pairs())
    records = {"image_id": [], "image": [], "captions": [], "objects": []}
    split_index = SPLITS.index(split)
    for i in tqdm(range(count), desc=f"rendering {split}", disable=count < 500, leave=False):
        rng = np.random.default_rng([seed, split_index, i])
        must = spec.held_out_pairs()[int(rng.integers(len(held_out)))] if split == "test_novel" else None
        scene = sample_scene(spec, rng, must_include=must, exclude=set() if split == "test_novel" else held_out)
        image = render_scene(scene, spec, image_size, rng)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        records["image_id"].append(f"{spec.name}-{split}-{seed}-{i:06d}")
        records["image"].append({"bytes": buffer.getvalue(), "path": None})
        records["captions"].append(make_captions(scene, rng))
        records["objects"].append([{k: o[k] for k in ("shape", "colour", "size")} for o in scene["objects"]])
    features = Features(
        {
            "image_id": Value("string"),
            "image": Image(),
            "captions": Sequence(Value("string")),
            "objects": [{"shape": Value("string"), "colour": Value("string"), "size": Value("string")}],
        }
    )
    return Dataset.from_dict(records, features=features)


def generate_world(
    output_dir: str | Path, num_images: int, seed: int, image_size: int = 64, domain: str = "synthetic"
) -> dict:
    """Write `output_dir/data/{split}-00000-of-00001.parquet` for every split and `output_dir/world.json`."""
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    spec = domain_spec(domain)
    output_dir = Path(output_dir)
    (output_dir / "data").mkdir(parents=True, exist_ok=True)
    counts = split_sizes(num_images)
    for split, count in counts.items():
        dataset = generate_split(split, count, seed, image_size, spec)
        dataset.to_parquet(str(output_dir / "data" / f"{split}-00000-of-00001.parquet"))
        logger.info("wrote %d %s images", count, split)
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
        "held_out_pairs": [list(p) for p in spec.held_out_pairs()],
    }
    (output_dir / "world.json").write_text(json.dumps(world, indent=2))
    return world


# ----------------------------------------------------------------------------------------------------------------
# Hallucination (CHAIR-style)
def mentioned_objects(caption: str, domain: str | None = None) -> list[tuple[str | None, str]]:
    """(colour or None, shape) for every shape word of a caption, over every domain's vocabulary by default.

    A colour belongs to a shape when it stands in the two words before it ("a red circle", "two large red
    circles") or right after "that is" ("a circle that is red").
    """
    specs = [domain_spec(domain)] if domain else list(DOMAINS.values())
    shapes = {s: s for spec in specs for s in spec.shapes} | {_plural(s): s for spec in specs for s in spec.shapes}
    colours = {c for spec in specs for c in spec.colours}
    words = re.findall(r"[a-z]+", caption.lower())
    mentions = []
    for i, word in enumerate(words):
        if word not in shapes:
            continue
        before = [w for w in words[max(0, i - 2) : i] if w in colours]
        after = words[i + 1 : i + 4]
        colour = before[-1] if before else (after[2] if after[:2] == ["that", "is"] and after[2:] and after[2] in colours else None)
        mentions.append((colour, shapes[word]))
    return mentions


def hallucination_rate(predictions: dict[str, str], objects: dict[str, list[dict]], domain: str | None = None) -> float:
    """Share of mentioned objects that are not in the image.

    A mention is hallucinated when its shape is absent, or when it names a colour and no object of that colour
    and shape is present. The rate is hallucinated mentions ÷ all mentions over the predictions (0 if none).
    """
    total = hallucinated = 0
    for image_id, caption in predictions.items():
        present = {(o["colour"], o["shape"]) for o in objects[image_id]}
        shapes = {shape for _, shape in present}
        for colour, shape in mentioned_objects(caption, domain):
            total += 1
            hallucinated += shape not in shapes or (colour is not None and (colour, shape) not in present)
    return hallucinated / total if total else 0.0
