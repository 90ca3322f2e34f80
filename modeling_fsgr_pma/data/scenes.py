"""A synthetic world that resembles COCO: scenes of composite icons, a long tail, relations, and a nocaps-like split.

Each image is one of seven scene types (park, beach, kitchen table, street, night, snow, living room), each with its
own background and its own distribution over 49 object categories, drawn as composite icons built from primitives
(a house is a wall, a roof, a door and windows) with random pose (mirror, tilt), scale (perspective, size), colour,
pattern (plain, striped, spotted, checked) and partial occlusion (objects nearer the bottom are drawn in front).
Categories come in groups of 1–4 of a kind; some stand on others ("a cat on a bench"). Category frequency is
long-tailed, as in COCO: a head of common categories, a body, and a tail of rare ones.

Ground truth per image (the Parquet columns): `objects` (one record per instance: category, colour, size, pattern,
its group's count, group id, salience, centre and box as fractions of the image side), `relations` (instance pairs:
`left of`, `above`, `on`, `next to`, `in front of`) and `scene` (the scene type).

Captions (five per image) come from a grammar of sixteen sentence structures with a lexicon of synonyms and
paraphrases; a caption names the salient objects, with counts, attributes and relations where a person would.
`compose_captions` works on the stored ground truth, so an oracle captioner (`oracle_captions`) can write captions
from the true scene of any generated image.

Splits: `train`, `validation`, `test` (in-distribution); `test_novel` (every image holds one colour–category or
category–scene combination that never occurs in the other splits: nocaps' near-domain); `test_out_domain` (every image
holds one of six categories that never occur in the other splits, but are in the concept vocabulary: nocaps'
out-domain). `pretraining=True` lets the out-domain categories and the held-out combinations into `train`, for the
tiny CLIP's pre-training set (OpenAI's CLIP has seen nocaps' classes, and green cars).
The second world, `scenes-b` (`DOMAIN_B`, splits `train`, `validation`, `test`), is a new domain for fine-tuning: every
image holds one of the out-domain categories among in-domain context, as `test_out_domain` does.
Everything is deterministic for a seed.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Image, Sequence, Value
from PIL import Image as PILImage
from PIL import ImageDraw
from tqdm.auto import tqdm

from modeling_fsgr_pma.evaluation.metrics import TokenizedCiderD

logger = logging.getLogger(__name__)

DOMAIN = "scenes"
DOMAIN_B = "scenes-b"  # the second scene world, for domain transfer: every image holds an out-domain category
SPLITS = ("train", "validation", "test", "test_novel", "test_out_domain")
DEFAULT_SPLIT_FRACTIONS = {"validation": 0.1, "test": 0.1, "test_novel": 0.1, "test_out_domain": 0.1}
DEFAULT_IMAGE_SIZE = 96

COLOURS = {
    "red": (205, 40, 40), "orange": (240, 140, 30), "yellow": (240, 210, 40), "green": (50, 150, 60),
    "blue": (40, 90, 200), "purple": (130, 60, 170), "pink": (240, 140, 180), "brown": (125, 80, 40),
    "white": (245, 245, 245), "black": (30, 30, 30), "grey": (128, 128, 128),
}  # fmt: skip
SIZES = {"small": 0.7, "medium": 1.0, "large": 1.35}  # factor on the category's radius
PATTERNS = ("plain", "striped", "spotted", "checked")

# Fixed colours of icon details.
DARK, WHITE, GLASS, WOOD = (35, 35, 40), (240, 240, 240), (170, 210, 240), (115, 75, 40)
LEAF, ORANGE, YELLOW, SKIN, RED = (40, 135, 50), (240, 140, 30), (245, 215, 60), (230, 190, 150), (210, 40, 40)

# An icon is a list of primitives in tile coordinates (0..1, y down), drawn in order. Paint "B" is the body (its
# colour and pattern), "D" a darker and "L" a lighter shade of it, "X" cuts the shape away, an RGB tuple is fixed.
# ("e", box, paint) ellipse · ("r", box, paint) rectangle · ("p", points, paint) polygon ·
# ("l", points, width, paint) line · ("pie", box, start, end, paint) · ("arc", box, start, end, width, paint)
_WHEELS = [("e", (0.12, 0.62, 0.34, 0.84), DARK), ("e", (0.66, 0.62, 0.88, 0.84), DARK)]


def _star_points(cx: float, cy: float, r: float, inner: float) -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.pi * np.arange(10) / 5
    radii = np.where(np.arange(10) % 2 == 0, r, inner * r)
    return [(cx + a * np.cos(t), cy + a * np.sin(t)) for a, t in zip(radii, angles)]


ICONS = {
    "house": [("r", (0.15, 0.45, 0.85, 0.97), "B"), ("p", [(0.06, 0.48), (0.5, 0.08), (0.94, 0.48)], "D"),
              ("r", (0.43, 0.68, 0.57, 0.97), WOOD), ("r", (0.22, 0.56, 0.36, 0.68), GLASS),
              ("r", (0.64, 0.56, 0.78, 0.68), GLASS)],
    "tree": [("r", (0.43, 0.55, 0.57, 0.98), WOOD), ("e", (0.12, 0.06, 0.88, 0.66), "B"),
             ("e", (0.3, 0.2, 0.55, 0.4), "L")],
    "pine tree": [("r", (0.44, 0.78, 0.56, 0.98), WOOD), ("p", [(0.5, 0.04), (0.8, 0.45), (0.2, 0.45)], "B"),
                  ("p", [(0.5, 0.25), (0.9, 0.8), (0.1, 0.8)], "B")],
    "car": [("r", (0.04, 0.45, 0.96, 0.74), "B"), ("p", [(0.22, 0.46), (0.33, 0.24), (0.67, 0.24), (0.78, 0.46)], "B"),
            ("p", [(0.3, 0.44), (0.37, 0.3), (0.48, 0.3), (0.48, 0.44)], GLASS),
            ("p", [(0.52, 0.44), (0.52, 0.3), (0.63, 0.3), (0.7, 0.44)], GLASS), *_WHEELS],
    "bus": [("r", (0.02, 0.22, 0.98, 0.78), "B"), ("r", (0.06, 0.3, 0.26, 0.48), GLASS),
            ("r", (0.3, 0.3, 0.5, 0.48), GLASS), ("r", (0.54, 0.3, 0.74, 0.48), GLASS),
            ("r", (0.78, 0.3, 0.94, 0.6), GLASS), ("r", (0.02, 0.52, 0.98, 0.56), "D"),
            ("e", (0.1, 0.68, 0.28, 0.86), DARK), ("e", (0.72, 0.68, 0.9, 0.86), DARK)],
    "truck": [("r", (0.03, 0.2, 0.64, 0.76), "L"), ("r", (0.64, 0.36, 0.97, 0.76), "B"),
              ("r", (0.72, 0.42, 0.9, 0.56), GLASS), *_WHEELS],
    "bicycle": [("arc", (0.04, 0.5, 0.4, 0.86), 0, 360, 0.05, DARK), ("arc", (0.6, 0.5, 0.96, 0.86), 0, 360, 0.05, DARK),
                ("l", [(0.22, 0.68), (0.42, 0.42), (0.7, 0.42), (0.78, 0.68)], 0.06, "B"),
                ("l", [(0.42, 0.42), (0.5, 0.68), (0.7, 0.42)], 0.06, "B"), ("l", [(0.36, 0.34), (0.48, 0.34)], 0.05, DARK),
                ("l", [(0.7, 0.42), (0.66, 0.3)], 0.05, DARK)],
    "boat": [("p", [(0.04, 0.6), (0.96, 0.6), (0.8, 0.86), (0.2, 0.86)], "B"), ("l", [(0.5, 0.1), (0.5, 0.6)], 0.04, WOOD),
             ("p", [(0.53, 0.12), (0.53, 0.56), (0.88, 0.56)], WHITE), ("p", [(0.47, 0.2), (0.47, 0.56), (0.2, 0.56)], WHITE)],
    "fish": [("e", (0.12, 0.3, 0.74, 0.7), "B"), ("p", [(0.68, 0.5), (0.96, 0.26), (0.96, 0.74)], "B"),
             ("e", (0.22, 0.42, 0.3, 0.5), DARK), ("arc", (0.32, 0.36, 0.5, 0.64), 300, 60, 0.03, "D")],
    "cup": [("p", [(0.18, 0.3), (0.68, 0.3), (0.63, 0.92), (0.23, 0.92)], "B"),
            ("arc", (0.56, 0.4, 0.86, 0.72), 270, 90, 0.07, "B")],
    "plate": [("e", (0.02, 0.62, 0.98, 0.94), "B"), ("e", (0.2, 0.68, 0.8, 0.88), "L")],
    "clock": [("e", (0.08, 0.08, 0.92, 0.92), "B"), ("e", (0.18, 0.18, 0.82, 0.82), WHITE),
              ("l", [(0.5, 0.5), (0.5, 0.26)], 0.05, DARK), ("l", [(0.5, 0.5), (0.68, 0.55)], 0.05, DARK)],
    "flower": [("l", [(0.5, 0.45), (0.5, 0.98)], 0.06, LEAF), ("e", (0.52, 0.62, 0.72, 0.74), LEAF),
               ("e", (0.36, 0.04, 0.64, 0.3), "B"), ("e", (0.36, 0.36, 0.64, 0.62), "B"), ("e", (0.18, 0.2, 0.44, 0.46), "B"),
               ("e", (0.56, 0.2, 0.82, 0.46), "B"), ("e", (0.4, 0.24, 0.6, 0.44), YELLOW)],
    "dog": [("e", (0.14, 0.4, 0.74, 0.7), "B"), ("e", (0.6, 0.18, 0.92, 0.48), "B"), ("e", (0.6, 0.2, 0.7, 0.46), "D"),
            ("r", (0.2, 0.6, 0.3, 0.95), "B"), ("r", (0.56, 0.6, 0.66, 0.95), "B"),
            ("l", [(0.16, 0.5), (0.04, 0.3)], 0.06, "B"), ("e", (0.78, 0.28, 0.83, 0.33), DARK),
            ("e", (0.88, 0.34, 0.95, 0.4), DARK)],
    "cat": [("e", (0.2, 0.46, 0.72, 0.82), "B"), ("e", (0.52, 0.2, 0.88, 0.54), "B"),
            ("p", [(0.54, 0.3), (0.58, 0.06), (0.7, 0.24)], "B"), ("p", [(0.72, 0.24), (0.84, 0.06), (0.88, 0.3)], "B"),
            ("l", [(0.22, 0.7), (0.06, 0.6), (0.1, 0.34)], 0.06, "B"), ("e", (0.6, 0.32, 0.66, 0.38), (120, 200, 60)),
            ("e", (0.74, 0.32, 0.8, 0.38), (120, 200, 60)), ("r", (0.3, 0.76, 0.38, 0.96), "B"),
            ("r", (0.56, 0.76, 0.64, 0.96), "B")],
    "bird": [("e", (0.16, 0.36, 0.7, 0.72), "B"), ("e", (0.52, 0.18, 0.8, 0.46), "B"),
             ("p", [(0.78, 0.28), (0.96, 0.33), (0.78, 0.38)], ORANGE), ("p", [(0.24, 0.46), (0.46, 0.3), (0.54, 0.58)], "D"),
             ("e", (0.64, 0.26, 0.7, 0.32), DARK), ("l", [(0.38, 0.7), (0.36, 0.9)], 0.03, ORANGE),
             ("l", [(0.5, 0.7), (0.52, 0.9)], 0.03, ORANGE), ("p", [(0.18, 0.5), (0.02, 0.4), (0.04, 0.6)], "D")],
    "duck": [("e", (0.06, 0.46, 0.8, 0.86), "B"), ("e", (0.52, 0.14, 0.84, 0.46), "B"),
             ("p", [(0.8, 0.3), (0.98, 0.34), (0.98, 0.4), (0.8, 0.4)], ORANGE), ("e", (0.66, 0.24, 0.72, 0.3), DARK),
             ("p", [(0.2, 0.56), (0.5, 0.5), (0.4, 0.7)], "D")],
    "kite": [("p", [(0.5, 0.02), (0.82, 0.38), (0.5, 0.74), (0.18, 0.38)], "B"),
             ("l", [(0.5, 0.02), (0.5, 0.74)], 0.03, "D"), ("l", [(0.18, 0.38), (0.82, 0.38)], 0.03, "D"),
             ("l", [(0.5, 0.74), (0.4, 0.86), (0.56, 0.92), (0.46, 0.99)], 0.03, DARK)],
    "ball": [("e", (0.18, 0.34, 0.82, 0.98), "B"), ("arc", (0.3, 0.34, 0.7, 0.98), 260, 100, 0.04, "D")],
    "bench": [("r", (0.04, 0.28, 0.96, 0.38), "B"), ("r", (0.04, 0.44, 0.96, 0.54), "B"), ("r", (0.02, 0.54, 0.98, 0.6), "D"),
              ("r", (0.1, 0.6, 0.16, 0.94), DARK), ("r", (0.84, 0.6, 0.9, 0.94), DARK)],
    "umbrella": [("pie", (0.04, 0.1, 0.96, 0.9), 180, 360, "B"), ("l", [(0.5, 0.48), (0.5, 0.9)], 0.04, DARK),
                 ("arc", (0.36, 0.82, 0.5, 0.96), 0, 180, 0.04, DARK)],
    "sun": [("e", (0.24, 0.24, 0.76, 0.76), "B"),
            *[("l", [(0.5 + 0.32 * np.cos(t), 0.5 + 0.32 * np.sin(t)), (0.5 + 0.48 * np.cos(t), 0.5 + 0.48 * np.sin(t))],
               0.05, "B") for t in np.arange(8) * np.pi / 4]],
    "cloud": [("e", (0.04, 0.42, 0.46, 0.82), "B"), ("e", (0.26, 0.2, 0.7, 0.72), "B"), ("e", (0.52, 0.36, 0.96, 0.82), "B"),
              ("r", (0.24, 0.6, 0.76, 0.82), "B")],
    "moon": [("e", (0.12, 0.12, 0.88, 0.88), "B"), ("e", (0.34, 0.02, 1.1, 0.78), "X")],
    "star": [("p", _star_points(0.5, 0.52, 0.48, 0.45), "B")],
    "snowman": [("e", (0.2, 0.44, 0.8, 0.98), WHITE), ("e", (0.3, 0.16, 0.7, 0.54), WHITE),
                ("r", (0.34, 0.06, 0.66, 0.2), DARK), ("r", (0.28, 0.18, 0.72, 0.22), DARK),
                ("r", (0.3, 0.46, 0.7, 0.54), "B"), ("p", [(0.5, 0.34), (0.66, 0.38), (0.5, 0.4)], ORANGE),
                ("e", (0.4, 0.26, 0.45, 0.31), DARK), ("e", (0.55, 0.26, 0.6, 0.31), DARK)],
    "traffic light": [("r", (0.33, 0.04, 0.67, 0.66), "B"), ("e", (0.4, 0.08, 0.6, 0.26), RED),
                      ("e", (0.4, 0.26, 0.6, 0.44), YELLOW), ("e", (0.4, 0.44, 0.6, 0.62), (60, 200, 80)),
                      ("r", (0.46, 0.66, 0.54, 0.99), DARK)],
    "stop sign": [("r", (0.46, 0.5, 0.54, 0.99), (120, 120, 125)),
                  ("p", [(0.5 + 0.36 * np.cos(t), 0.34 + 0.36 * np.sin(t)) for t in np.pi / 8 + np.arange(8) * np.pi / 4],
                   "B"), ("r", (0.26, 0.3, 0.74, 0.38), WHITE)],
    "person": [("e", (0.38, 0.02, 0.62, 0.24), SKIN), ("p", [(0.34, 0.26), (0.66, 0.26), (0.7, 0.62), (0.3, 0.62)], "B"),
               ("l", [(0.34, 0.3), (0.2, 0.56)], 0.07, "B"), ("l", [(0.66, 0.3), (0.8, 0.56)], 0.07, "B"),
               ("r", (0.34, 0.6, 0.47, 0.98), DARK), ("r", (0.53, 0.6, 0.66, 0.98), DARK)],
    "apple": [("e", (0.16, 0.3, 0.84, 0.96), "B"), ("l", [(0.5, 0.34), (0.54, 0.14)], 0.05, WOOD),
              ("e", (0.56, 0.12, 0.78, 0.24), LEAF)],
    "banana": [("arc", (0.06, -0.3, 0.94, 0.86), 25, 155, 0.16, "B"), ("e", (0.1, 0.4, 0.18, 0.5), WOOD)],
    "bottle": [("r", (0.33, 0.36, 0.67, 0.97), "B"), ("p", [(0.33, 0.38), (0.44, 0.24), (0.56, 0.24), (0.67, 0.38)], "B"),
               ("r", (0.44, 0.08, 0.56, 0.26), "B"), ("r", (0.42, 0.03, 0.58, 0.1), DARK),
               ("r", (0.33, 0.56, 0.67, 0.76), WHITE)],
    "cake": [("r", (0.12, 0.5, 0.88, 0.94), "B"), ("r", (0.12, 0.42, 0.88, 0.54), WHITE),
             ("r", (0.47, 0.22, 0.53, 0.42), (250, 240, 200)), ("e", (0.44, 0.1, 0.56, 0.24), ORANGE)],
    "bowl": [("pie", (0.04, 0.2, 0.96, 0.96), 0, 180, "B"), ("r", (0.04, 0.54, 0.96, 0.6), "D")],
    "vase": [("p", [(0.36, 0.08), (0.64, 0.08), (0.6, 0.24), (0.82, 0.6), (0.62, 0.97), (0.38, 0.97), (0.18, 0.6),
                    (0.4, 0.24)], "B")],
    "candle": [("r", (0.38, 0.34, 0.62, 0.97), "B"), ("l", [(0.5, 0.34), (0.5, 0.26)], 0.03, DARK),
               ("e", (0.42, 0.06, 0.58, 0.3), YELLOW), ("e", (0.46, 0.14, 0.54, 0.28), ORANGE)],
    "book": [("r", (0.12, 0.3, 0.88, 0.86), "B"), ("r", (0.16, 0.74, 0.88, 0.82), WHITE), ("r", (0.12, 0.3, 0.2, 0.86), "D")],
    "lamp": [("p", [(0.28, 0.06), (0.72, 0.06), (0.86, 0.42), (0.14, 0.42)], "B"), ("r", (0.46, 0.42, 0.54, 0.9), DARK),
             ("e", (0.26, 0.86, 0.74, 0.98), DARK)],
    "chair": [("r", (0.22, 0.06, 0.32, 0.6), "B"), ("r", (0.22, 0.5, 0.8, 0.6), "B"), ("r", (0.22, 0.6, 0.3, 0.98), "D"),
              ("r", (0.72, 0.6, 0.8, 0.98), "D")],
    "couch": [("r", (0.1, 0.24, 0.9, 0.56), "D"), ("r", (0.04, 0.5, 0.96, 0.82), "B"), ("r", (0.02, 0.4, 0.14, 0.82), "B"),
              ("r", (0.86, 0.4, 0.98, 0.82), "B"), ("r", (0.08, 0.82, 0.14, 0.94), DARK), ("r", (0.86, 0.82, 0.92, 0.94), DARK)],
    "tv": [("r", (0.06, 0.12, 0.94, 0.74), "B"), ("r", (0.12, 0.18, 0.88, 0.68), (70, 110, 160)),
           ("p", [(0.4, 0.74), (0.6, 0.74), (0.68, 0.94), (0.32, 0.94)], DARK)],
    "potted plant": [("e", (0.16, 0.1, 0.5, 0.6), LEAF), ("e", (0.5, 0.1, 0.84, 0.6), LEAF), ("e", (0.3, 0.02, 0.7, 0.5), LEAF),
                     ("p", [(0.26, 0.58), (0.74, 0.58), (0.66, 0.97), (0.34, 0.97)], "B")],
    "mushroom": [("r", (0.38, 0.5, 0.62, 0.96), WHITE), ("pie", (0.08, 0.14, 0.92, 0.86), 180, 360, "B"),
                 ("e", (0.3, 0.26, 0.4, 0.36), WHITE), ("e", (0.58, 0.3, 0.68, 0.4), WHITE)],
    "butterfly": [("e", (0.06, 0.12, 0.5, 0.52), "B"), ("e", (0.5, 0.12, 0.94, 0.52), "B"), ("e", (0.16, 0.46, 0.5, 0.84), "D"),
                  ("e", (0.5, 0.46, 0.84, 0.84), "D"), ("l", [(0.5, 0.14), (0.5, 0.86)], 0.06, DARK)],
    "crab": [("e", (0.2, 0.4, 0.8, 0.78), "B"), ("e", (0.02, 0.16, 0.26, 0.4), "B"), ("e", (0.74, 0.16, 0.98, 0.4), "B"),
             ("l", [(0.26, 0.7), (0.1, 0.92)], 0.04, "B"), ("l", [(0.74, 0.7), (0.9, 0.92)], 0.04, "B"),
             ("e", (0.38, 0.36, 0.46, 0.44), DARK), ("e", (0.54, 0.36, 0.62, 0.44), DARK)],
    "starfish": [("p", _star_points(0.5, 0.54, 0.46, 0.38), "B"), ("e", (0.44, 0.48, 0.56, 0.6), "L")],
    "penguin": [("e", (0.22, 0.2, 0.78, 0.96), DARK), ("e", (0.34, 0.36, 0.66, 0.92), WHITE), ("e", (0.3, 0.04, 0.7, 0.4), DARK),
                ("p", [(0.46, 0.24), (0.54, 0.24), (0.5, 0.34)], ORANGE), ("r", (0.3, 0.92, 0.46, 0.98), ORANGE),
                ("r", (0.54, 0.92, 0.7, 0.98), ORANGE), ("r", (0.34, 0.42, 0.66, 0.5), "B")],
    "sled": [("r", (0.1, 0.46, 0.9, 0.64), "B"), ("l", [(0.06, 0.84), (0.9, 0.84), (0.98, 0.74)], 0.05, DARK),
             ("l", [(0.24, 0.64), (0.24, 0.84)], 0.04, DARK), ("l", [(0.76, 0.64), (0.76, 0.84)], 0.04, DARK)],
    "airplane": [("e", (0.04, 0.4, 0.96, 0.6), "B"), ("p", [(0.36, 0.48), (0.6, 0.48), (0.44, 0.9)], "D"),
                 ("p", [(0.36, 0.5), (0.6, 0.5), (0.46, 0.14)], "D"), ("p", [(0.04, 0.5), (0.16, 0.5), (0.06, 0.22)], "B"),
                 ("r", (0.72, 0.44, 0.86, 0.5), GLASS)],
    # The out-domain categories (test_out_domain only, and the CLIP pre-training set)
    "rocket": [("p", [(0.5, 0.02), (0.66, 0.3), (0.66, 0.78), (0.34, 0.78), (0.34, 0.3)], "B"),
               ("e", (0.42, 0.3, 0.58, 0.46), GLASS), ("p", [(0.34, 0.56), (0.16, 0.86), (0.34, 0.78)], "D"),
               ("p", [(0.66, 0.56), (0.84, 0.86), (0.66, 0.78)], "D"), ("p", [(0.4, 0.78), (0.6, 0.78), (0.5, 0.98)], ORANGE)],
    "guitar": [("e", (0.2, 0.46, 0.66, 0.96), "B"), ("e", (0.26, 0.28, 0.6, 0.62), "B"), ("e", (0.36, 0.62, 0.5, 0.76), DARK),
               ("l", [(0.43, 0.5), (0.78, 0.06)], 0.06, WOOD), ("r", (0.74, 0.02, 0.86, 0.12), DARK)],
    "anchor": [("l", [(0.5, 0.16), (0.5, 0.9)], 0.08, "B"), ("arc", (0.14, 0.46, 0.86, 0.94), 20, 160, 0.08, "B"),
               ("arc", (0.38, 0.02, 0.62, 0.26), 0, 360, 0.06, "B"), ("l", [(0.3, 0.3), (0.7, 0.3)], 0.07, "B")],
    "bell": [("p", [(0.5, 0.08), (0.66, 0.16), (0.72, 0.5), (0.9, 0.8), (0.1, 0.8), (0.28, 0.5), (0.34, 0.16)], "B"),
             ("e", (0.42, 0.76, 0.58, 0.94), "D"), ("arc", (0.42, 0.0, 0.58, 0.14), 180, 360, 0.04, "D")],
    "cactus": [("r", (0.4, 0.1, 0.6, 0.96), "B"), ("r", (0.14, 0.34, 0.28, 0.6), "B"), ("r", (0.14, 0.54, 0.42, 0.64), "B"),
               ("r", (0.72, 0.22, 0.86, 0.5), "B"), ("r", (0.58, 0.44, 0.86, 0.54), "B"), ("e", (0.4, 0.02, 0.6, 0.2), "B")],
    "lighthouse": [("p", [(0.38, 0.2), (0.62, 0.2), (0.72, 0.98), (0.28, 0.98)], WHITE),
                   ("p", [(0.35, 0.42), (0.65, 0.42), (0.67, 0.56), (0.33, 0.56)], "B"),
                   ("p", [(0.31, 0.7), (0.69, 0.7), (0.71, 0.84), (0.29, 0.84)], "B"), ("r", (0.38, 0.08, 0.62, 0.2), YELLOW),
                   ("p", [(0.34, 0.08), (0.5, 0.0), (0.66, 0.08)], "B")],
}  # fmt: skip


@dataclass(frozen=True)
class Category:
    """One object category.

    Attributes:
        name: the category (and concept) name.
        nouns: (singular, plural) wordings, the first the most common; the CHAIR synonym list of the category.
        weight: relative frequency (the long tail: head 6, body 3.5, tail 1).
        scenes: scene types it occurs in.
        colours: the colours it comes in, the first the most common.
        radius: half its size as a fraction of the image side (medium size, nearest the viewer).
        place: `"ground"`, `"sky"`, `"water"` or `"wall"`: the band of the scene it stands in.
        patterned: it may be striped, spotted or checked.
        verbs: participles a caption may use ("a dog sitting in a park").
        sits_on: categories it may stand on ("a cat on a bench").
    """

    name: str
    nouns: tuple[tuple[str, str], ...]
    weight: float
    scenes: tuple[str, ...]
    colours: tuple[str, ...]
    radius: float
    place: str = "ground"
    patterned: bool = False
    verbs: tuple[str, ...] = ("standing",)
    sits_on: tuple[str, ...] = ()


H, M, T = 6.0, 3.5, 1.0  # head, body and tail weights
PARK, BEACH, KITCHEN, STREET, NIGHT, SNOW, ROOM = "park", "beach", "kitchen", "street", "night", "snow", "living room"
_OBJECT_VERBS = ("sitting", "resting", "placed")
CATEGORIES = {c.name: c for c in (
    Category("person", (("person", "people"), ("man", "men"), ("woman", "women"), ("child", "children"), ("boy", "boys"), ("girl", "girls")), H,
             (PARK, BEACH, STREET, SNOW, ROOM, NIGHT), ("blue", "red", "green", "yellow", "white", "black", "purple", "orange"),
             0.12, patterned=True, verbs=("standing", "walking", "waiting", "posing", "relaxing"), sits_on=("bench", "boat", "sled")),
    Category("car", (("car", "cars"), ("automobile", "automobiles")), H, (STREET, NIGHT, SNOW),
             ("red", "blue", "white", "black", "grey", "yellow", "green"), 0.13, verbs=("parked", "driving")),
    Category("tree", (("tree", "trees"),), H, (PARK, STREET, NIGHT, SNOW), ("green", "orange", "yellow", "red"), 0.16,
             verbs=("standing", "growing")),
    Category("dog", (("dog", "dogs"), ("puppy", "puppies"), ("pup", "pups")), H, (PARK, STREET, ROOM, SNOW, BEACH),
             ("brown", "black", "white", "grey", "yellow"), 0.09, patterned=True, verbs=("sitting", "standing", "playing", "running", "resting"),
             sits_on=("bench", "couch", "sled", "boat")),
    Category("cat", (("cat", "cats"), ("kitten", "kittens"), ("kitty", "kitties")), H, (ROOM, KITCHEN, NIGHT, PARK),
             ("grey", "black", "orange", "white", "brown"), 0.08, patterned=True, verbs=("sitting", "sleeping", "resting", "lying", "napping"),
             sits_on=("bench", "couch", "chair", "car")),
    Category("bird", (("bird", "birds"), ("songbird", "songbirds")), H, (PARK, BEACH, STREET, SNOW), ("blue", "red", "yellow", "brown", "black"),
             0.06, place="sky", verbs=("flying", "perched", "soaring"), sits_on=("house", "bench", "car", "boat")),
    Category("cup", (("cup", "cups"), ("mug", "mugs"), ("coffee cup", "coffee cups"), ("teacup", "teacups")), H, (KITCHEN, ROOM), ("white", "red", "blue", "yellow", "green", "pink"),
             0.07, patterned=True, verbs=_OBJECT_VERBS, sits_on=("plate", "book")),
    Category("house", (("house", "houses"), ("home", "homes"), ("cottage", "cottages")), H, (STREET, NIGHT, SNOW, PARK),
             ("red", "white", "yellow", "blue", "brown", "grey"), 0.17),
    Category("chair", (("chair", "chairs"),), H, (ROOM, KITCHEN), ("brown", "red", "blue", "black", "white", "green"), 0.11),
    Category("boat", (("boat", "boats"), ("sailboat", "sailboats"), ("sailing boat", "sailing boats"), ("yacht", "yachts")), H, (BEACH,), ("white", "red", "blue", "yellow", "brown"),
             0.14, place="water", verbs=("floating", "sailing")),
    Category("flower", (("flower", "flowers"), ("blossom", "blossoms")), M, (PARK, KITCHEN, ROOM),
             ("red", "yellow", "pink", "purple", "white", "blue", "orange"), 0.07, verbs=("growing", "blooming")),
    Category("clock", (("clock", "clocks"), ("wall clock", "wall clocks")), M, (KITCHEN, ROOM), ("black", "white", "brown", "red", "blue"), 0.08,
             place="wall", verbs=("hanging",)),
    Category("bus", (("bus", "buses"), ("city bus", "city buses")), M, (STREET,), ("yellow", "red", "blue", "white", "green"), 0.18,
             verbs=("parked", "driving")),
    Category("truck", (("truck", "trucks"), ("lorry", "lorries")), M, (STREET, SNOW), ("white", "red", "blue", "grey"), 0.16,
             verbs=("parked", "driving")),
    Category("bench", (("bench", "benches"), ("park bench", "park benches")), M, (PARK, STREET), ("brown", "green", "grey", "black"), 0.13),
    Category("umbrella", (("umbrella", "umbrellas"), ("parasol", "parasols")), M, (BEACH, STREET, PARK),
             ("red", "blue", "yellow", "green", "purple", "pink", "black"), 0.11, patterned=True, verbs=("open",)),
    Category("kite", (("kite", "kites"),), M, (PARK, BEACH), ("red", "yellow", "blue", "green", "purple", "orange", "pink"),
             0.08, place="sky", patterned=True, verbs=("flying",)),
    Category("ball", (("ball", "balls"), ("beach ball", "beach balls")), M, (PARK, BEACH, ROOM), ("red", "blue", "yellow", "green", "orange", "white"),
             0.06, patterned=True, verbs=("lying", "resting"), sits_on=("bench", "chair")),
    Category("plate", (("plate", "plates"), ("dish", "dishes")), M, (KITCHEN,), ("white", "blue", "yellow", "green"), 0.1,
             patterned=True, verbs=_OBJECT_VERBS),
    Category("bottle", (("bottle", "bottles"),), M, (KITCHEN, BEACH), ("green", "brown", "blue", "white"), 0.08,
             verbs=_OBJECT_VERBS),
    Category("book", (("book", "books"),), M, (ROOM, KITCHEN), ("red", "blue", "green", "brown", "black", "yellow", "purple"),
             0.07, verbs=("lying", "resting"), sits_on=("chair", "couch", "bench")),
    Category("couch", (("couch", "couches"), ("sofa", "sofas")), M, (ROOM,), ("red", "blue", "grey", "brown", "green", "purple"),
             0.17, patterned=True),
    Category("tv", (("tv", "tvs"), ("television", "televisions"), ("tv set", "tv sets")), M, (ROOM,), ("black", "grey", "white"), 0.13),
    Category("cloud", (("cloud", "clouds"),), M, (PARK, BEACH, SNOW, STREET), ("white", "grey"), 0.11, place="sky",
             verbs=("floating", "drifting")),
    Category("lamp", (("lamp", "lamps"), ("table lamp", "table lamps")), M, (ROOM, NIGHT), ("white", "yellow", "red", "green", "blue"), 0.11),
    Category("apple", (("apple", "apples"),), M, (KITCHEN,), ("red", "green", "yellow"), 0.06, verbs=_OBJECT_VERBS,
             sits_on=("plate",)),
    Category("potted plant", (("potted plant", "potted plants"), ("house plant", "house plants"), ("plant", "plants")), M, (ROOM, KITCHEN),
             ("brown", "red", "white", "blue"), 0.1),
    Category("moon", (("moon", "moons"),), M, (NIGHT,), ("yellow", "white"), 0.09, place="sky", verbs=("shining", "glowing")),
    Category("bicycle", (("bicycle", "bicycles"), ("bike", "bikes"), ("cycle", "cycles")), M, (STREET, PARK), ("red", "blue", "black", "green", "yellow"),
             0.12, verbs=("parked", "leaning")),
    Category("sun", (("sun", "suns"),), M, (PARK, BEACH), ("yellow", "orange"), 0.09, place="sky", verbs=("shining",)),
    Category("star", (("star", "stars"),), M, (NIGHT,), ("yellow", "white"), 0.04, place="sky", verbs=("shining", "twinkling")),
    Category("snowman", (("snowman", "snowmen"),), M, (SNOW,), ("red", "blue", "green"), 0.12),
    Category("pine tree", (("pine tree", "pine trees"), ("fir tree", "fir trees"), ("evergreen tree", "evergreen trees")), M, (SNOW, NIGHT), ("green",), 0.15,
             verbs=("standing", "growing")),
    Category("traffic light", (("traffic light", "traffic lights"), ("traffic signal", "traffic signals")), M, (STREET, NIGHT), ("black", "yellow", "grey"), 0.12),
    Category("fish", (("fish", "fish"),), M, (BEACH,), ("orange", "yellow", "blue", "red", "purple", "pink"), 0.07,
             place="water", patterned=True, verbs=("swimming",)),
    Category("bowl", (("bowl", "bowls"),), M, (KITCHEN,), ("white", "blue", "red", "green", "yellow"), 0.09, patterned=True,
             verbs=_OBJECT_VERBS),
    Category("banana", (("banana", "bananas"),), T, (KITCHEN,), ("yellow", "green"), 0.07, verbs=_OBJECT_VERBS,
             sits_on=("plate",)),
    Category("cake", (("cake", "cakes"), ("birthday cake", "birthday cakes")), T, (KITCHEN,), ("pink", "white", "brown", "yellow"), 0.09, verbs=_OBJECT_VERBS,
             sits_on=("plate",)),
    Category("vase", (("vase", "vases"),), T, (KITCHEN, ROOM), ("blue", "white", "red", "green", "purple"), 0.08,
             patterned=True, verbs=_OBJECT_VERBS),
    Category("candle", (("candle", "candles"),), T, (KITCHEN, NIGHT, ROOM), ("white", "red", "yellow", "pink"), 0.06,
             verbs=("burning",), sits_on=("book",)),
    Category("stop sign", (("stop sign", "stop signs"),), T, (STREET,), ("red",), 0.1),
    Category("airplane", (("airplane", "airplanes"), ("plane", "planes"), ("jet", "jets")), T, (PARK, STREET, BEACH), ("white", "grey", "red", "blue"),
             0.11, place="sky", verbs=("flying",)),
    Category("duck", (("duck", "ducks"),), T, (BEACH, PARK), ("yellow", "white", "brown"), 0.07, place="water",
             verbs=("swimming", "floating")),
    Category("butterfly", (("butterfly", "butterflies"),), T, (PARK,), ("orange", "blue", "yellow", "purple", "pink"), 0.05,
             place="sky", patterned=True, verbs=("flying", "fluttering")),
    Category("mushroom", (("mushroom", "mushrooms"), ("toadstool", "toadstools")), T, (PARK, SNOW), ("red", "brown", "orange"), 0.06, verbs=("growing",)),
    Category("crab", (("crab", "crabs"),), T, (BEACH,), ("red", "orange"), 0.06, verbs=("walking", "crawling")),
    Category("starfish", (("starfish", "starfish"),), T, (BEACH,), ("orange", "red", "pink", "purple"), 0.05,
             verbs=("lying",)),
    Category("penguin", (("penguin", "penguins"),), T, (SNOW,), ("red", "blue", "yellow"), 0.08,
             verbs=("standing", "waddling"), sits_on=("sled",)),
    Category("sled", (("sled", "sleds"), ("sledge", "sledges")), T, (SNOW,), ("red", "brown", "blue"), 0.1, verbs=("lying",)),
    # Out-domain: never in train/validation/test/test_novel; named in the concept vocabulary and the CLIP pre-training.
    Category("rocket", (("rocket", "rockets"),), M, (NIGHT, PARK), ("white", "red", "grey"), 0.12, place="sky",
             verbs=("flying", "launching")),
    Category("guitar", (("guitar", "guitars"),), M, (ROOM, BEACH), ("brown", "red", "black", "yellow"), 0.1,
             verbs=("lying", "resting"), sits_on=("couch", "chair")),
    Category("anchor", (("anchor", "anchors"),), M, (BEACH,), ("black", "grey", "red"), 0.07, verbs=("lying",)),
    Category("bell", (("bell", "bells"),), M, (SNOW, ROOM, KITCHEN), ("yellow", "grey", "red"), 0.07, place="wall",
             verbs=("hanging",)),
    Category("cactus", (("cactus", "cacti"),), M, (PARK, ROOM), ("green",), 0.11, verbs=("growing", "standing")),
    Category("lighthouse", (("lighthouse", "lighthouses"),), M, (BEACH,), ("red", "blue", "black"), 0.16,
             verbs=("standing",)),
)}  # fmt: skip
OUT_DOMAIN = ("rocket", "guitar", "anchor", "bell", "cactus", "lighthouse")
IN_DOMAIN = tuple(name for name in CATEGORIES if name not in OUT_DOMAIN)

# Combinations held out of train/validation/test: every test_novel image holds one of them.
HELD_OUT_COLOURS = (
    ("green", "car"), ("purple", "umbrella"), ("red", "bus"), ("pink", "cup"), ("blue", "flower"), ("black", "dog"),
    ("yellow", "boat"), ("white", "cat"),
)
HELD_OUT_SCENES = (("dog", BEACH), ("cat", NIGHT), ("bird", SNOW), ("umbrella", STREET), ("cup", ROOM), ("ball", BEACH))


@dataclass(frozen=True)
class SceneType:
    """A scene type: how often it occurs, its background bands and the phrases that name it.

    Attributes:
        name: the scene type.
        weight: relative frequency.
        bands: place → (top, bottom) of the band objects of that place stand in (fractions of the image side).
        layers: background layers, top to bottom: (bottom edge, RGB).
        phrases: prepositional phrases ("in a park").
        nouns: noun phrases ("a sunny park").
    """

    name: str
    weight: float
    bands: dict
    layers: tuple[tuple[float, tuple[int, int, int]], ...]
    phrases: tuple[str, ...]
    nouns: tuple[str, ...]


_SKY, _GRASS, _SEA, _SAND = (150, 200, 240), (95, 170, 75), (45, 115, 195), (230, 210, 155)
SCENE_TYPES = {s.name: s for s in (
    SceneType(PARK, 0.22, {"sky": (0.03, 0.36), "ground": (0.45, 0.98)}, ((0.4, _SKY), (1.0, _GRASS)),
              ("in a park", "in the park", "on the grass", "in a grassy field", "on a lawn", "in a meadow", "outside", "in a quiet park", "in a public park"),
              ("a park", "a grassy park", "a sunny park", "a green field", "a meadow", "a lawn", "a quiet park")),
    SceneType(BEACH, 0.12, {"sky": (0.03, 0.3), "water": (0.36, 0.6), "ground": (0.64, 0.98)},
              ((0.33, _SKY), (0.62, _SEA), (1.0, _SAND)),
              ("on the beach", "at the beach", "by the sea", "at the seaside", "near the ocean", "on the shore"),
              ("a beach", "a sandy beach", "the seaside", "a sunny beach", "the shore", "an ocean view", "a tropical beach")),
    SceneType(KITCHEN, 0.17, {"wall": (0.04, 0.36), "ground": (0.48, 0.98)}, ((0.42, (235, 225, 200)), (1.0, (170, 120, 70))),
              ("on a kitchen table", "on the table", "on a wooden table", "in a kitchen", "on a dining table",
               "on the counter"),
              ("a kitchen table", "a wooden table", "a kitchen", "a dining table", "a table top", "a kitchen counter", "a clean kitchen")),
    SceneType(STREET, 0.2, {"sky": (0.03, 0.3), "ground": (0.5, 0.98)},
              ((0.36, _SKY), (0.48, (175, 165, 150)), (1.0, (105, 105, 110))),
              ("on a city street", "on the street", "on the road", "in the city", "on a busy street", "downtown"),
              ("a city street", "a busy road", "a street scene", "an urban street", "a road", "a busy intersection", "a quiet street")),
    SceneType(NIGHT, 0.07, {"sky": (0.03, 0.42), "ground": (0.55, 0.98), "wall": (0.03, 0.42)},
              ((0.5, (20, 25, 60)), (1.0, (45, 50, 55))),
              ("at night", "in the dark", "under the night sky", "late at night", "in the evening"),
              ("a night scene", "a dark night", "the night sky", "a starry night", "a night time scene", "a clear night")),
    SceneType(SNOW, 0.08, {"sky": (0.03, 0.34), "ground": (0.44, 0.98), "wall": (0.03, 0.34)},
              ((0.4, (200, 205, 215)), (1.0, (246, 246, 250))),
              ("in the snow", "on a snowy field", "on a snowy day", "in winter", "on a winter day"),
              ("a snowy field", "a winter scene", "a snowy landscape", "a cold winter day", "a snow covered hill", "a frozen field")),
    SceneType(ROOM, 0.14, {"wall": (0.04, 0.42), "ground": (0.52, 0.98)}, ((0.48, (205, 185, 160)), (1.0, (140, 100, 70))),
              ("in a living room", "in the living room", "in a cozy room", "indoors", "in a lounge", "in a family room"),
              ("a living room", "a cozy living room", "a family room", "a lounge", "a room", "an indoor scene", "a bright room")),
)}  # fmt: skip

RELATIONS = ("left of", "above", "on", "next to", "in front of")
# How captions word each relation; the inverse wordings swap subject and object ("below" = the object is above).
RELATION_WORDS = {
    "left of": ("to the left of", "left of"), "above": ("above", "over"), "on": ("on", "on top of"),
    "next to": ("next to", "beside", "near", "by"), "in front of": ("in front of",),
}  # fmt: skip
INVERSE_RELATION_WORDS = {"left of": ("to the right of", "right of"), "above": ("below", "under", "beneath"),
                          "in front of": ("behind",)}  # fmt: skip
NUMBER_WORDS = {2: ("two", "a pair of", "a couple of"), 3: ("three", "several"), 4: ("four", "several", "a group of")}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
PATTERN_WORDS = {"striped": ("striped", "stripy"), "spotted": ("spotted", "polka dot"), "checked": ("checked", "checkered")}
COLOUR_WORDS = {colour: (colour,) for colour in COLOURS} | {"grey": ("grey", "gray")}
# Words people add that the metrics do not check ("a cute dog", "an old house"), by category.
QUALITY_WORDS = {
    **dict.fromkeys(("dog", "cat", "bird", "duck", "penguin", "butterfly", "crab", "fish"), ("cute", "young", "happy")),
    **dict.fromkeys(("house", "bench", "chair", "boat", "clock", "book", "lamp", "couch", "tv", "sled"),
                    ("old", "new", "wooden", "modern", "nice")),
    **dict.fromkeys(("car", "bus", "truck", "bicycle", "airplane"), ("shiny", "new", "old", "fast")),
    **dict.fromkeys(("tree", "pine tree", "flower", "potted plant", "mushroom"), ("tall", "lush", "wild", "leafy")),
    **dict.fromkeys(("sun", "moon", "star", "cloud", "kite", "umbrella"), ("bright", "colorful", "fluffy", "lone")),
    **dict.fromkeys(("cup", "plate", "bowl", "vase", "bottle", "candle", "apple", "banana", "cake"),
                    ("fresh", "clean", "empty", "full", "pretty")),
}  # fmt: skip


def split_sizes(num_images: int, split_fractions: dict[str, float] | None = None) -> dict[str, int]:
    """Images per split: `num_images` for `train`, `round(fraction × num_images)` (at least 1) for the others."""
    fractions = DEFAULT_SPLIT_FRACTIONS if split_fractions is None else split_fractions
    if set(fractions) != set(SPLITS[1:]) or any(f <= 0 for f in fractions.values()):
        raise ValueError(f"split_fractions needs a positive fraction for each of {SPLITS[1:]}, got {fractions}")
    return {"train": num_images} | {split: max(1, round(fractions[split] * num_images)) for split in SPLITS[1:]}


def concept_vocabulary() -> list[str]:
    """Concept names for the codebook: every category (the out-domain ones too), colour, pattern and scene type."""
    patterns = [pattern for pattern in PATTERNS if pattern != "plain"]
    return list(CATEGORIES) + list(COLOURS) + patterns + list(SCENE_TYPES)


# ----------------------------------------------------------------------------------------------------------------
# Scenes
def _weighted_choice(rng: np.random.Generator, options: list, weights) -> object:
    weights = np.asarray(weights, dtype=np.float64)
    return options[int(rng.choice(len(options), p=weights / weights.sum()))]


def sample_scene(rng: np.random.Generator, split: str, index: int, pretraining: bool = False) -> dict:
    """One scene: its type and its objects with boxes, relations and salience (the ground truth as stored).

    Args:
        rng: the image's own generator.
        split: `test_novel` forces one held-out combination, `test_out_domain` one out-domain category; the other
            splits hold neither (with `pretraining`, `train` holds both: see `pretraining`).
        index: the image's index in its split (chooses the forced combination or category in turn).
        pretraining: let the out-domain categories and the held-out combinations into `train` (every fourth
            image forces a held-out combination, as `test_novel` does), for the tiny CLIP's pre-training set.

    Returns:
        `{"scene": {"type"}, "objects": [...], "relations": [...]}`; see `generate_split` for the fields.
    """
    forced_colour, forced = None, None
    pretraining = pretraining and split == "train"
    if split == "test_novel" or (pretraining and index % 4 == 0):  # pre-training: every 4th image a held-out pair
        turn = index if split == "test_novel" else index // 4
        if turn % 2 == 0:
            forced_colour, forced = HELD_OUT_COLOURS[(turn // 2) % len(HELD_OUT_COLOURS)]
            allowed = [s for s in CATEGORIES[forced].scenes if (forced, s) not in HELD_OUT_SCENES]
            scene_type = allowed[int(rng.integers(len(allowed)))]
        else:
            forced, scene_type = HELD_OUT_SCENES[(turn // 2) % len(HELD_OUT_SCENES)]
    elif split == "test_out_domain":
        forced = OUT_DOMAIN[index % len(OUT_DOMAIN)]
        scene_type = CATEGORIES[forced].scenes[int(rng.integers(len(CATEGORIES[forced].scenes)))]
    else:
        scene_type = _weighted_choice(rng, list(SCENE_TYPES), [s.weight for s in SCENE_TYPES.values()])
    candidates = [
        c for c in CATEGORIES.values()
        if scene_type in c.scenes and (pretraining or (c.name, scene_type) not in HELD_OUT_SCENES)
        and (pretraining or c.name not in OUT_DOMAIN) and c.name != forced
    ]  # fmt: skip
    num_groups = int(rng.choice(5, p=[0.08, 0.27, 0.32, 0.21, 0.12])) + 1
    chosen = [CATEGORIES[forced]] if forced else []
    while len(chosen) < num_groups and candidates:
        category = _weighted_choice(rng, candidates, [c.weight for c in candidates])
        candidates.remove(category)
        chosen.append(category)
    groups = []
    for position, category in enumerate(chosen):
        colours = [c for c in category.colours if pretraining or split in ("test_novel", "test_out_domain") or
                   (c, category.name) not in HELD_OUT_COLOURS] or list(category.colours)  # fmt: skip
        colour = forced_colour if (position == 0 and forced_colour) else colours[
            int(rng.choice(len(colours), p=_decaying(len(colours))))]
        count = int(rng.choice(4, p=[0.58, 0.24, 0.11, 0.07])) + 1
        if category.radius >= 0.15 or category.name in ("sun", "moon"):
            count = 1  # one house, one bus, one sun: big things rarely come in crowds here
        size = "large" if position == 0 and forced else str(rng.choice(list(SIZES), p=[0.3, 0.45, 0.25]))
        pattern = str(rng.choice(PATTERNS, p=[0.64, 0.12, 0.12, 0.12])) if category.patterned else "plain"
        groups.append({"category": category.name, "colour": colour, "size": size, "pattern": pattern, "count": count})
    return _layout(groups, scene_type, rng)


def _decaying(n: int) -> np.ndarray:
    """Colour probabilities: the first colour of a category the most common (weights 1, 1/2, 1/3, ...)."""
    weights = 1 / np.arange(1, n + 1)
    return weights / weights.sum()


def _overlap(a: list[float], b: list[float]) -> float:
    """Intersection area ÷ the smaller box's area."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return width * height / smaller


def _layout(groups: list[dict], scene_type: str, rng: np.random.Generator) -> dict:
    """Place every group's instances in its scene band (some on a supporting object), then derive relations."""
    spec = SCENE_TYPES[scene_type]
    objects, supports = [], []  # supports: (instance, supporter instance)
    present = {g["category"]: gi for gi, g in enumerate(groups)}
    for gi, group in enumerate(groups):
        category = CATEGORIES[group["category"]]
        placed_groups = {o["group"] for o in objects}
        supporters = [present[s] for s in category.sits_on if s in present and present[s] in placed_groups]
        on = supporters[0] if supporters and rng.random() < 0.7 else None
        band = spec.bands.get(category.place, spec.bands["ground"])
        placed = 0
        for k in range(group["count"]):
            for attempt in range(30):
                if on is not None:
                    bases = [o for o in objects if o["group"] == on]
                    base = bases[int(rng.integers(len(bases)))]
                    r = category.radius * SIZES[group["size"]] * (base["box"][3] - base["box"][1]) / (
                        2 * CATEGORIES[base["category"]].radius * SIZES[base["size"]]) * 0.8
                    x = float(rng.uniform(base["box"][0] + r * 0.6, base["box"][2] - r * 0.6)) if base["box"][2] - \
                        base["box"][0] > 1.2 * r else (base["box"][0] + base["box"][2]) / 2
                    bottom = base["box"][1] + 0.25 * (base["box"][3] - base["box"][1])
                else:
                    depth = float(rng.uniform(0, 1))
                    bottom = band[0] + depth * (band[1] - band[0])
                    scale = 0.7 + 0.5 * depth if category.place == "ground" else 1.0
                    r = category.radius * SIZES[group["size"]] * scale
                    if category.place != "ground":  # the centre stays in the band
                        bottom = max(bottom, band[0] + r)
                    if k and placed:  # instances of a group stand near each other
                        first = next(o for o in reversed(objects) if o["group"] == gi)
                        x = first["x"] + float(rng.choice([-1, 1]) * rng.uniform(1.4, 2.2)) * r * k
                        bottom = first["box"][3] + float(rng.uniform(-0.05, 0.05))
                    else:
                        x = float(rng.uniform(r, 1 - r))
                box = [x - r, bottom - 2 * r, x + r, bottom]
                if not objects and attempt == 29:
                    box = [0.5 - r, 0.98 - 2 * r, 0.5 + r, 0.98]  # never an empty scene
                    x, bottom = 0.5, 0.98
                    break
                if box[0] < -0.2 * r or box[2] > 1 + 0.2 * r or box[1] < -0.1 * r or box[3] > 1.0:
                    continue
                limit = 0.6 if on is not None else 0.35
                if all(_overlap(box, o["box"]) <= limit or (on is not None and o["group"] == on) for o in objects):
                    break
            else:
                continue
            objects.append({
                "category": group["category"], "colour": group["colour"], "size": group["size"],
                "pattern": group["pattern"], "group": gi, "x": x, "y": bottom - r, "box": box,
                "flip": bool(rng.random() < 0.5), "tilt": float(rng.uniform(-10, 10)),
            })  # fmt: skip
            if on is not None:
                supports.append((len(objects) - 1, next(i for i, o in enumerate(objects) if o["group"] == on)))
            placed += 1
    # Renumber groups densely (a group may have lost every instance), count what was placed.
    kept = sorted({o["group"] for o in objects})
    for o in objects:
        o["group"] = kept.index(o["group"])
    for o in objects:
        o["count"] = sum(p["group"] == o["group"] for p in objects)
    # Drawing order: sky and wall first, then back to front (a lower bottom edge is nearer the viewer).
    supported = {s for s, _ in supports}
    order = sorted(range(len(objects)), key=lambda i: (
        0 if CATEGORIES[objects[i]["category"]].place in ("sky", "wall") and i not in supported else 1,
        objects[i]["box"][3] + (1.0 if i in supported else 0.0),
    ))
    rank = {old: new for new, old in enumerate(order)}
    objects = [objects[i] for i in order]
    supports = [(rank[s], rank[t]) for s, t in supports]
    for o in objects:
        o["x"], o["y"] = round(o["x"], 4), round(o["y"], 4)
        o["box"] = [round(v, 4) for v in o["box"]]
    _mark_salient(objects)
    return {"scene": {"type": scene_type}, "objects": objects, "relations": _relations(objects, supports)}


def _mark_salient(objects: list[dict]) -> None:
    """A group is salient when its area (times 1.5 for people and animals, as people look at them) is at least a
    third of the largest group's; at most three groups."""
    lively = {"person", "dog", "cat", "bird", "duck", "penguin", "fish", "crab", "butterfly"}
    score: dict[int, float] = {}
    for o in objects:
        area = (o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1])
        score[o["group"]] = score.get(o["group"], 0.0) + area * (1.5 if o["category"] in lively else 1.0)
    ranked = sorted(score, key=lambda g: -score[g])
    salient = {g for g in ranked[:3] if score[g] >= score[ranked[0]] / 3}
    for o in objects:
        o["salient"] = o["group"] in salient


def _relations(objects: list[dict], supports: list[tuple[int, int]]) -> list[dict]:
    """Pairwise relations between instances of different groups, from the boxes and the supports.

    `on`: placed on the other; `in front of`: the boxes overlap (≥ 10 % of the smaller) and its bottom edge is
    lower (it is drawn over the other); `next to`: bottom edges within 0.1 and a gap under 0.1 of the side;
    `above`: its bottom edge is above the other's top, horizontally within 0.3; `left of`: its right edge left of
    the other's left edge.
    """
    relations = []
    on_pairs = set(supports)
    for i, a in enumerate(objects):
        for j, b in enumerate(objects):
            if i == j or a["group"] == b["group"]:
                continue
            ba, bb = a["box"], b["box"]
            if (i, j) in on_pairs:
                relations.append({"subject": i, "predicate": "on", "object": j})
                continue
            if (j, i) in on_pairs:
                continue
            overlap = _overlap(ba, bb)
            if overlap >= 0.1 and ba[3] > bb[3] + 0.02 and i > j:
                relations.append({"subject": i, "predicate": "in front of", "object": j})
            gap = max(ba[0], bb[0]) - min(ba[2], bb[2])
            if i < j and abs(ba[3] - bb[3]) < 0.1 and gap < 0.1 and overlap < 0.1:
                relations.append({"subject": i, "predicate": "next to", "object": j})
                relations.append({"subject": j, "predicate": "next to", "object": i})
            if ba[3] <= bb[1] + 0.02 and abs(a["x"] - b["x"]) < 0.3:
                relations.append({"subject": i, "predicate": "above", "object": j})
            if ba[2] <= bb[0]:
                relations.append({"subject": i, "predicate": "left of", "object": j})
    return relations


# ----------------------------------------------------------------------------------------------------------------
# Rendering
def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """Darker (factor < 1) or mixed towards white (factor > 1)."""
    if factor <= 1:
        return tuple(int(c * factor) for c in rgb)
    return tuple(int(c + (255 - c) * (factor - 1)) for c in rgb)


def _body_texture(rgb: tuple[int, int, int], pattern: str, side: int) -> PILImage.Image:
    """The body's paint: its colour, with stripes, spots or checks in a contrasting shade."""
    y, x = np.mgrid[0:side, 0:side] / side
    if pattern == "striped":
        mark = ((x + y) / 0.18) % 1 < 0.45
    elif pattern == "spotted":
        mark = (((x / 0.2) % 1 - 0.5) ** 2 + ((y / 0.2) % 1 - 0.5) ** 2) < 0.07
    elif pattern == "checked":
        mark = ((x // 0.16 + y // 0.16) % 2).astype(bool)
    else:
        mark = np.zeros((side, side), dtype=bool)
    contrast = np.array(_shade(rgb, 0.35) if sum(rgb) > 450 else WHITE, dtype=np.uint8)
    pixels = np.where(mark[..., None], contrast, np.array(rgb, dtype=np.uint8))
    return PILImage.fromarray(pixels.astype(np.uint8))


def render_icon(category: str, rgb: tuple[int, int, int], pattern: str, side: int) -> PILImage.Image:
    """An RGBA tile of `side` pixels with the category's icon, transparent around it."""
    tile = PILImage.new("RGBA", (side, side), (0, 0, 0, 0))
    body = _body_texture(rgb, pattern, side)
    s = side

    def scaled(points):
        return [(px * s, py * s) for px, py in points]

    for primitive in ICONS[category]:
        kind, paint = primitive[0], primitive[-1]
        mask = PILImage.new("L", (side, side), 0)
        draw = ImageDraw.Draw(mask)
        if kind == "e":
            draw.ellipse(scaled([primitive[1][:2], primitive[1][2:]]), fill=255)
        elif kind == "r":
            draw.rectangle(scaled([primitive[1][:2], primitive[1][2:]]), fill=255)
        elif kind == "p":
            draw.polygon(scaled(primitive[1]), fill=255)
        elif kind == "l":
            draw.line(scaled(primitive[1]), fill=255, width=max(1, round(primitive[2] * s)), joint="curve")
        elif kind == "pie":
            draw.pieslice(scaled([primitive[1][:2], primitive[1][2:]]), primitive[2], primitive[3], fill=255)
        elif kind == "arc":
            draw.arc(scaled([primitive[1][:2], primitive[1][2:]]), primitive[2], primitive[3], fill=255,
                     width=max(1, round(primitive[4] * s)))
        else:
            raise ValueError(f"Unknown icon primitive {kind!r}")
        if paint == "X":
            alpha = np.asarray(tile.getchannel("A")).copy()
            alpha[np.asarray(mask) > 0] = 0
            tile.putalpha(PILImage.fromarray(alpha))
        elif paint == "B":
            tile.paste(body, mask=mask)
        else:
            colour = {"D": _shade(rgb, 0.6), "L": _shade(rgb, 1.45)}.get(paint, paint)
            tile.paste(tuple(colour) + (255,), mask=mask)
    return tile


def _background(scene_type: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """The scene's bands with jittered colours, a soft gradient and noise: `(side, side, 3)` uint8."""
    spec = SCENE_TYPES[scene_type]
    y = (np.arange(side) + 0.5) / side
    image = np.zeros((side, side, 3), dtype=np.float32)
    top = 0.0
    for bottom, rgb in spec.layers:
        bottom = bottom + float(rng.uniform(-0.03, 0.03)) if bottom < 1 else 1.0
        rows = (y >= top) & (y < bottom)
        base = np.clip(np.array(rgb) + rng.integers(-12, 13, size=3), 0, 255)
        shade = 0.92 + 0.16 * (y[rows] - top) / max(bottom - top, 1e-3)
        image[rows] = base[None, None] * shade[:, None, None]
        top = bottom
    if scene_type == NIGHT:  # tiny far stars
        for _ in range(int(rng.integers(5, 15))):
            r, c = int(rng.integers(0, side // 3)), int(rng.integers(0, side))
            image[r, c] = 230
    image += rng.normal(0, 4, size=(side, side, 1))
    return np.clip(image, 0, 255).astype(np.uint8)


def render_scene(record: dict, image_size: int, rng: np.random.Generator) -> PILImage.Image:
    """Draw the scene at 2× and downsample (anti-aliasing). Objects are drawn in their stored order."""
    side = 2 * image_size
    canvas = PILImage.fromarray(_background(record["scene"]["type"], side, rng))
    for obj in record["objects"]:
        rgb = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLOURS[obj["colour"]])
        tile, corner = placed_icon(obj, side, rgb, obj["pattern"])
        canvas.paste(tile, corner, tile)
    return canvas.resize((image_size, image_size), PILImage.LANCZOS)


def placed_icon(
    obj: dict, side: int, rgb: tuple[int, int, int], pattern: str
) -> tuple[PILImage.Image, tuple[int, int]]:
    """The object's RGBA icon as drawn on a `side`-pixel canvas (its box's width, mirrored and tilted), and the
    canvas position of its top-left corner."""
    x0, y0, x1, _ = (round(v * side) for v in obj["box"])
    tile = render_icon(obj["category"], rgb, pattern, max(4, x1 - x0))
    if obj["flip"]:
        tile = tile.transpose(PILImage.FLIP_LEFT_RIGHT)
    return tile.rotate(obj["tilt"], resample=PILImage.BICUBIC), (x0, y0)


def patch_objects(objects: list[dict], image_size: int, grid_size: int, min_cover: float = 0.25) -> np.ndarray:
    """Which object each patch of a `grid_size`² grid shows: `(grid_size**2,)` object indices, -1 for background.

    The icons' own silhouettes (`placed_icon`, as `render_scene` draws them, later objects over earlier ones) are
    rasterised at `image_size`; see `patch_owners` for the rule.
    """
    owner = np.full((image_size, image_size), -1, dtype=np.int64)
    for index, obj in enumerate(objects):
        tile, (x0, y0) = placed_icon(obj, image_size, (0, 0, 0), "plain")
        rows, cols = np.nonzero(np.asarray(tile.getchannel("A")) > 127)  # the silhouette's pixels in the tile
        rows, cols = rows + y0, cols + x0
        inside = (rows >= 0) & (rows < image_size) & (cols >= 0) & (cols < image_size)
        owner[rows[inside], cols[inside]] = index
    return patch_owners(owner, len(objects), grid_size, min_cover)


def patch_owners(owner: np.ndarray, num_objects: int, grid_size: int, min_cover: float) -> np.ndarray:
    """`(S, S)` pixel owners (object index, -1 for background) → `(grid_size**2,)` patch owners: a patch shows the
    object that covers most of its pixels, when that object covers at least `min_cover` of them, else -1."""
    if not num_objects:
        return np.full(grid_size**2, -1, dtype=np.int64)
    patch = owner.shape[0] // grid_size
    cells = owner[: patch * grid_size, : patch * grid_size].reshape(grid_size, patch, grid_size, patch)
    cells = cells.transpose(0, 2, 1, 3).reshape(grid_size**2, patch * patch)  # (n, pixels per patch)
    cover = np.stack([(cells == index).mean(1) for index in range(num_objects)], 1)  # (n, objects)
    return np.where(cover.max(1) >= min_cover, cover.argmax(1), -1)


# ----------------------------------------------------------------------------------------------------------------
# Captions: a grammar of sixteen structures over the ground truth
@dataclass
class _Group:
    index: int
    category: str
    count: int
    colour: str
    size: str
    pattern: str
    salient: bool
    area: float


def _groups(record: dict) -> list[_Group]:
    groups: dict[int, _Group] = {}
    for o in record["objects"]:
        area = (o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1])
        if o["group"] in groups:
            groups[o["group"]].area += area
        else:
            groups[o["group"]] = _Group(o["group"], o["category"], o["count"], o["colour"], o["size"], o["pattern"],
                                        o["salient"], area)
    return sorted(groups.values(), key=lambda g: -g.area)


def _group_relations(record: dict) -> list[tuple[int, str, int]]:
    """Relations between groups (held by some pair of their instances), without duplicates, in a stable order."""
    group_of = [o["group"] for o in record["objects"]]
    seen = []
    for r in record["relations"]:
        triple = (group_of[r["subject"]], r["predicate"], group_of[r["object"]])
        if triple not in seen:
            seen.append(triple)
    return seen


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


class _Writer:
    """Words one caption: noun phrases, relation and scene phrases, chosen from the lexicon with the image's rng."""

    def __init__(self, record: dict, rng: np.random.Generator):
        self.rng = rng
        self.scene = SCENE_TYPES[record["scene"]["type"]]
        self.groups = _groups(record)
        self.by_index = {g.index: g for g in self.groups}
        self.relations = _group_relations(record)
        self.salient = [g for g in self.groups if g.salient] or self.groups[:1]

    def pick(self, options):
        """One of `options`, the first the most common (weights 1, 1/2, 1/3, ...), as people favour some words."""
        return options[int(self.rng.choice(len(options), p=_decaying(len(options))))]

    def main(self) -> _Group:
        """A salient group, the largest most often."""
        weights = np.array([2.0 ** -i for i in range(len(self.salient))])
        return self.salient[int(self.rng.choice(len(self.salient), p=weights / weights.sum()))]

    def np(self, group: _Group) -> str:
        """A noun phrase: count, size, colour, pattern and noun, each attribute where a person might say it."""
        category = CATEGORIES[group.category]
        nouns = category.nouns
        singular, plural = self.pick(nouns)
        words = []
        if group.size != "medium" and self.rng.random() < 0.35:
            words.append(self.pick(SIZE_WORDS[group.size]))
        if len(category.colours) > 1 and self.rng.random() < 0.7 or self.rng.random() < 0.08:
            words.append(self.pick(COLOUR_WORDS[group.colour]))
        if group.pattern != "plain" and self.rng.random() < 0.7:
            words.append(self.pick(PATTERN_WORDS[group.pattern]))
        if self.rng.random() < 0.1 and group.category in QUALITY_WORDS:
            words.insert(0, self.pick(QUALITY_WORDS[group.category]))
        if group.count == 1:
            return _article(" ".join(words + [singular]))
        return " ".join([self.pick(NUMBER_WORDS[group.count])] + words + [plural])

    def be(self, group: _Group) -> str:
        return "is" if group.count == 1 else "are"

    def verb(self, group: _Group) -> str:
        return self.pick(CATEGORIES[group.category].verbs)

    def phrase(self) -> str:
        return self.pick(self.scene.phrases)

    def scene_np(self) -> str:
        return self.pick(self.scene.nouns)

    def listing(self, groups: list[_Group]) -> str:
        phrases = [self.np(g) for g in groups]
        return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]

    def relation(self) -> tuple[_Group, str, _Group] | None:
        """A relation involving a salient group, worded (the preferred kinds first: on, in front of, next to)."""
        salient = {g.index for g in self.salient}
        options = [r for r in self.relations if r[0] in salient or r[2] in salient]
        if not options:
            return None
        preference = {"on": 4.0, "in front of": 2.5, "next to": 2.5, "above": 1.5, "left of": 1.0}
        subject, predicate, obj = options[int(self.rng.choice(
            len(options), p=np.array([preference[r[1]] for r in options]) / sum(preference[r[1]] for r in options)))]
        if predicate in INVERSE_RELATION_WORDS and self.rng.random() < 0.35:
            return self.by_index[obj], self.pick(INVERSE_RELATION_WORDS[predicate]), self.by_index[subject]
        return self.by_index[subject], self.pick(RELATION_WORDS[predicate]), self.by_index[obj]

    def others(self, group: _Group, count: int) -> list[_Group]:
        """Up to `count` other groups, salient ones first."""
        rest = [g for g in self.salient if g is not group] + [g for g in self.groups if not g.salient]
        return rest[:count]


def _structure_relation(w: _Writer, template: str) -> str | None:
    relation = w.relation()
    if relation is None:
        return None
    a, word, b = relation
    return template.format(a=w.np(a), rel=word, b=w.np(b), pp=w.phrase(), scene=w.scene_np(), be=w.be(a),
                           verb=w.verb(a), picture=w.pick(("a picture", "a photo", "an image", "a photograph", "a snapshot")))


def _structure_with(w: _Writer, template: str, others: int, needed: int) -> str | None:
    main = w.main()
    rest = w.others(main, others)
    if len(rest) < needed:
        return None
    return template.format(a=w.np(main), b=w.listing(rest) if rest else "", pp=w.phrase(), scene=w.scene_np(),
                           be=w.be(main), verb=w.verb(main), rest=w.listing([main] + rest))


# name → function(writer) giving a caption or None when the scene cannot fill the structure
STRUCTURES = {
    "relation": lambda w: _structure_relation(w, "{a} {rel} {b}"),
    "relation_scene": lambda w: _structure_relation(w, "{a} {rel} {b} {pp}"),
    "picture_relation": lambda w: _structure_relation(w, "{picture} of {a} {rel} {b}"),
    "scene_first_relation": lambda w: _structure_relation(w, "{pp} there {be} {a} {rel} {b}"),
    "verb_relation": lambda w: _structure_relation(w, "{a} {be} {verb} {rel} {b}"),
    "scene_showing_relation": lambda w: _structure_relation(w, "{scene} showing {a} {rel} {b}"),
    "there_is": lambda w: _structure_with(w, "there {be} {a} {pp}", 0, 0),
    "and": lambda w: _structure_with(w, "{a} and {b} {pp}", 1, 1),
    "scene_with": lambda w: _structure_with(w, "{scene} with {rest}", int(w.rng.integers(0, 3)), 0),
    "verb": lambda w: _structure_with(w, "{a} {verb} {pp}", 0, 0),
    "seen": lambda w: _structure_with(w, "{rest} can be seen {pp}", int(w.rng.integers(0, 2)), 0),
    "close_up": lambda w: _structure_with(w, "a close up of {a}", 0, 0),
    "along_with": lambda w: _structure_with(w, "{a} along with {b}", 2, 2),
    "background": lambda w: _structure_with(w, "{a} with {b} in the background", 1, 1),
    "simple": lambda w: _structure_with(w, "{a} {pp}", 0, 0),
    "view": lambda w: _structure_with(w, "a view of {rest} {pp}", int(w.rng.integers(0, 2)), 0),
}
# Sampling weights: the always-applicable structures are drawn less often, so that no structure dominates.
STRUCTURE_WEIGHTS = {name: 1.5 if "relation" in name else (1.2 if name in ("and", "along_with", "background") else 0.8)
                     for name in STRUCTURES}  # fmt: skip


def compose_captions(record: dict, rng: np.random.Generator, count: int = 5) -> list[tuple[str, str]]:
    """`count` captions of a scene, each from a different structure: `[(structure name, caption), ...]`.

    Args:
        record: the ground truth as stored (`objects`, `relations`, `scene`).
        rng: chooses structures, the objects named and the words.
        count: captions to write (at most the number of structures the scene can fill).
    """
    writer = _Writer(record, rng)
    names = list(STRUCTURES)
    weights = np.array([STRUCTURE_WEIGHTS[n] for n in names])
    captions = []
    for name in [names[i] for i in rng.choice(len(names), size=len(names), replace=False, p=weights / weights.sum())]:
        caption = STRUCTURES[name](writer)
        if caption is not None:
            captions.append((name, " ".join(caption.split())))
        if len(captions) == count:
            break
    return captions


def make_captions(record: dict, rng: np.random.Generator) -> list[str]:
    """The five reference captions of a scene."""
    return [caption for _, caption in compose_captions(record, rng)]


def oracle_captions(records: dict[str, dict], seed: int = 0, candidates: int = 1) -> dict[str, str]:
    """An oracle captioner: one caption per image written by the grammar from the image's true scene.

    With `candidates` > 1 the oracle writes that many captions per image and keeps their consensus, the one with
    the highest CIDEr-D against the image's candidates (minimum Bayes risk decoding, as beam search seeks the mode):
    the references are never seen.

    Args:
        records: image id → ground truth (`objects`, `relations`, `scene`), as stored in the Parquet columns.
        seed: the oracle's own randomness (not the references').
        candidates: captions written per image.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be positive, got {candidates}")
    drafts = {
        image_id: [
            compose_captions(record, np.random.default_rng([seed, k, c, 7919]), count=1)[0][1] for c in range(candidates)
        ]
        for k, (image_id, record) in enumerate(records.items())
    }
    if candidates == 1:
        return {image_id: captions[0] for image_id, captions in drafts.items()}
    scorer = TokenizedCiderD(drafts)
    ids = [image_id for image_id, captions in drafts.items() for _ in captions]
    scores = scorer.score([caption for captions in drafts.values() for caption in captions], ids)
    scores = scores.reshape(len(drafts), candidates)  # (images, candidates)
    return {image_id: captions[int(scores[k].argmax())] for k, (image_id, captions) in enumerate(drafts.items())}


# ----------------------------------------------------------------------------------------------------------------
# The world on disk
FEATURES = Features({
    "image_id": Value("string"),
    "image": Image(),
    "captions": Sequence(Value("string")),
    "objects": [{
        "category": Value("string"), "colour": Value("string"), "size": Value("string"), "pattern": Value("string"),
        "count": Value("int32"), "group": Value("int32"), "salient": Value("bool"), "x": Value("float32"),
        "y": Value("float32"), "box": Sequence(Value("float32"), length=4), "flip": Value("bool"),
        "tilt": Value("float32"),
    }],
    "relations": [{"subject": Value("int32"), "predicate": Value("string"), "object": Value("int32")}],
    "scene": {"type": Value("string")},
})  # fmt: skip


def sample_example(
    split: str, index: int, seed: int, pretraining: bool = False, domain: str = DOMAIN
) -> tuple[dict, np.random.Generator]:
    """The scene of image `index` of `split` and its generator, seeded by (seed, split, index), for rendering and
    captioning next. In `DOMAIN_B` every split's images are drawn as `test_out_domain`'s are."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index, 25 if domain == DOMAIN else 26])
    return sample_scene(rng, "test_out_domain" if domain == DOMAIN_B else split, index, pretraining), rng


def render_example(
    split: str, index: int, seed: int, image_size: int, pretraining: bool = False, domain: str = DOMAIN
) -> tuple[PILImage.Image, list[str], dict]:
    """Image, five captions and ground truth of one example."""
    record, rng = sample_example(split, index, seed, pretraining, domain)
    image = render_scene(record, image_size, rng)
    return image, make_captions(record, rng), record


def generate_split(
    split: str, count: int, seed: int, image_size: int, pretraining: bool = False, domain: str = DOMAIN
) -> Dataset:
    """Render `count` images of `split`; image i draws from its own generator seeded by (seed, split, i)."""
    records = {name: [] for name in FEATURES}
    for i in tqdm(range(count), desc=f"rendering {split}", disable=count < 500, leave=False):
        image, captions, record = render_example(split, i, seed, image_size, pretraining, domain)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        records["image_id"].append(f"{domain}-{split}-{seed}-{i:06d}")
        records["image"].append({"bytes": buffer.getvalue(), "path": None})
        records["captions"].append(captions)
        records["objects"].append(record["objects"])
        records["relations"].append(record["relations"])
        records["scene"].append(record["scene"])
    return Dataset.from_dict(records, features=FEATURES)


def world_info(seed: int, image_size: int, counts: dict, pretraining: bool = False, domain: str = DOMAIN) -> dict:
    """The content of `world.json`."""
    return {
        "domain": domain, "seed": seed, "image_size": image_size, "counts": counts, "pretraining": pretraining,
        "categories": list(IN_DOMAIN), "out_domain_categories": list(OUT_DOMAIN), "scene_types": list(SCENE_TYPES),
        "colours": list(COLOURS), "sizes": list(SIZES), "patterns": list(PATTERNS), "relations": list(RELATIONS),
        "held_out_colours": [list(pair) for pair in HELD_OUT_COLOURS],
        "held_out_scenes": [list(pair) for pair in HELD_OUT_SCENES],
    }  # fmt: skip


def generate_world(
    output_dir: str | Path,
    num_images: int,
    seed: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    split_fractions: dict[str, float] | None = None,
    pretraining: bool = False,
    domain: str = DOMAIN,
) -> dict:
    """Write the world: `output_dir/data/{split}-00000-of-00001.parquet` per split and `world.json`.

    Args:
        output_dir: created if missing; existing split files are overwritten.
        num_images: training images; see `split_sizes` for the other splits.
        seed: the same seed (and arguments) gives the same files.
        image_size: side of the square images in pixels.
        split_fractions: see `split_sizes`.
        pretraining: let the out-domain categories and the held-out combinations into `train` (the tiny CLIP's
            pre-training set only).
        domain: `DOMAIN`, or `DOMAIN_B` (splits `train`, `validation`, `test`; every image an out-domain category).

    Returns:
        The content of `world.json`.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if domain not in (DOMAIN, DOMAIN_B) or (pretraining and domain == DOMAIN_B):
        raise ValueError(f"domain must be {DOMAIN!r} or {DOMAIN_B!r} (without pretraining), got {domain!r}")
    output_dir = Path(output_dir)
    (output_dir / "data").mkdir(parents=True, exist_ok=True)
    counts = split_sizes(num_images, split_fractions)
    if domain == DOMAIN_B:
        counts = {split: count for split, count in counts.items() if split in ("train", "validation", "test")}
    for split, count in counts.items():
        path = output_dir / "data" / f"{split}-00000-of-00001.parquet"
        generate_split(split, count, seed, image_size, pretraining, domain).to_parquet(str(path))
        logger.info("wrote %d %s images to %s", count, split, path)
    world = world_info(seed, image_size, counts, pretraining, domain)
    (output_dir / "world.json").write_text(json.dumps(world, indent=2))
    return world
