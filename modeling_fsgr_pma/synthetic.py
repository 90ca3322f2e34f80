"""The bundled synthetic captioning world: procedural scenes with known objects, and captions that describe them.

Scenes hold 1–4 objects (shape, colour, size, grid position) on a textured background. Each image gets six
differently worded reference captions and its ground-truth object list, with each object's centre. A fixed set of colour–shape pairs is held
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

    A patch shows the object that covers most of its pixels, when that object covers at least `min_cover` of them;
    later objects are drawn over earlier ones, as in `render_scene`. `objects` need their centres (`x`, `y`).
    """
    if not objects:
        return np.full(grid_size**2, -1, dtype=np.int64)
    owner = np.full((image_size, image_size), -1, dtype=np.int64)
    for index, obj in enumerate(objects):
        owner[np.asarray(_object_mask(obj, image_size)) > 127] = index
    patch = image_size // grid_size
    cells = owner[: patch * grid_size, : patch * grid_size].reshape(grid_size, patch, grid_size, patch)
    cells = cells.transpose(0, 2, 1, 3).reshape(grid_size**2, patch * patch)  # (n, pixels per patch)
    cover = np.stack([(cells == index).mean(1) for index in range(len(objects))], 1)  # (n, objects)
    best = cover.argmax(1)
    return np.where(cover.max(1) >= min_cover, best, -1)


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


def generate_split(split: str, count: int, seed: int, image_size: int, spec: Domain) -> Dataset:
    """Render `count` images of `split`; image i draws from its own generator seeded by (seed, split, i).

    `test_novel` images each contain one held-out pair (and may contain more); the other splits never do.
    """
    held_out = spec.held_out_pairs()
    records = {"image_id": [], "image": [], "captions": [], "objects": [], "background": []}
    split_index = SPLITS.index(split)
    for i in tqdm(range(count), desc=f"rendering {split}", disable=count < 500, leave=False):
        rng = np.random.default_rng([seed, split_index, i])
        if split == "test_novel":
            scene = sample_scene(spec, rng, must_include=held_out[int(rng.integers(len(held_out)))], exclude=set())
        else:
            scene = sample_scene(spec, rng, must_include=None, exclude=set(held_out))
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
