"""Look inside one caption: where each word looked, which concept each patch got, how much the memory was used.

`explain_image` captions an image greedily, then runs one teacher-forced forward with `output_attentions=True`
and reduces the attentions to small arrays (an [`Explanation`]); `plot_explanation` draws them as one figure.
Both work with the model class of this package and with the remote-code copy `AutoModel` loads from a saved
directory (they only read `FsgrPmaOutput` fields and the config).

Used by `fsgr-pma explain` (`cli/main.py`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

MEMORY_ACTIVE, MEMORY_OFF, MEMORY_NOT_REFRESHED = "active", "off", "not refreshed"


@dataclass
class Explanation:
    """What one greedy caption of one image attended to.

    Attributes:
        caption: the decoded caption (special tokens removed).
        tokens: the T generated tokens as text (BPE end-of-word marker removed), without BOS and EOS.
        token_ids: `(T,)` their ids.
        image: `(H, W, 3)` uint8, the image as the model saw it (resized, cropped, de-normalised).
        heatmaps: `(T, g, g)` cross-attention of the position that predicted each token onto the patch grid,
            averaged over all decoder layers and heads; each row sums to 1.
        concept_map: `(g, g)` codebook row assigned to every patch, or None when the model gives none.
        concept_names: one name per codebook row (`"concept N"` where the config has no names).
        concepts_used: whether the decoder reads the concept map (`config.use_fsgr`).
        memory_status: `"active"`, `"off"` (`use_memory=False`) or `"not refreshed"` (no prototypes yet).
        memory_mass: `(L,)` share of self-attention on the prototypes per decoder layer, averaged over heads and
            the positions that predicted the tokens (BOS alone when there are none); zeros unless active.
        prototype_mass: `(L, m)` the same share split over the m prototypes (m = 0 unless active);
            `prototype_mass.sum(-1) == memory_mass`.
    """

    caption: str
    tokens: list[str]
    token_ids: np.ndarray
    image: np.ndarray
    heatmaps: np.ndarray
    concept_map: np.ndarray | None
    concept_names: list[str]
    concepts_used: bool
    memory_status: str
    memory_mass: np.ndarray
    prototype_mass: np.ndarray

    @property
    def grid_size(self) -> int:
        return self.heatmaps.shape[-1]


# ----------------------------------------------------------------------------------------------------------------
# Pure reductions: attention tensors → arrays
def patch_heatmaps(cross_attentions: Sequence[torch.Tensor], num_patches: int) -> np.ndarray:
    """Mean over layers and heads of the first image's attention onto the patch tokens.

    Args:
        cross_attentions: per layer `(B, heads, T, num_patches)`, the patches of the square grid.
        num_patches: patches of the grid (a square number).

    Returns:
        `(T, g, g)` float32, g = sqrt(num_patches).
    """
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"num_patches must be a square number, got {num_patches}")
    stacked = torch.stack([layer[0].float() for layer in cross_attentions])  # (L, heads, T, n_patches)
    if stacked.shape[-1] != num_patches:
        raise ValueError(f"cross-attention has {stacked.shape[-1]} memory tokens, not the {num_patches} patches")
    mean = stacked.mean(dim=(0, 1))  # (T, n_patches)
    return mean.reshape(-1, grid, grid).cpu().numpy()  # (T, g, g)


def memory_usage(decoder_attentions: Sequence[torch.Tensor], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Share of the first image's self-attention that goes to the prototypes, per layer and per prototype.

    Args:
        decoder_attentions: per layer `(B, heads, T, S + m)`, the last m columns the prototypes.
        seq_len: S, the sequence columns (the teacher-forced input length, no cache).

    Returns:
        memory mass `(L,)` and per-prototype mass `(L, m)`, averaged over heads and the T query positions.
    """
    widths = {layer.shape[-1] for layer in decoder_attentions}
    if len(widths) != 1:
        raise ValueError(f"decoder layers disagree on the number of prototypes: key lengths {sorted(widths)}")
    stacked = torch.stack([layer[0].float() for layer in decoder_attentions])  # (L, heads, T, S + m)
    if stacked.shape[-1] < seq_len:
        raise ValueError(f"self-attention has {stacked.shape[-1]} keys, fewer than the {seq_len} sequence tokens")
    per_prototype = stacked[..., seq_len:].mean(dim=(1, 2))  # (L, m)
    return per_prototype.sum(-1).cpu().numpy(), per_prototype.cpu().numpy()


def token_texts(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """Each token id on its own as text: the tokenizer's decoder strips BPE markers (`red</w>` → `red`)."""
    texts = []
    for token_id in token_ids:
        text = tokenizer.decode([int(token_id)]).strip()
        texts.append(text or tokenizer.convert_ids_to_tokens(int(token_id)))
    return texts


def model_view(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the processor's normalisation: `(3, H, W)` pixel values → `(H, W, 3)` uint8."""
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]  # (3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]  # (3, 1, 1)
    image = pixel_values.detach().float().cpu() * std_t + mean_t  # (3, H, W)
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()  # (H, W, 3)


def concept_legend(concept_map: np.ndarray, names: Sequence[str]) -> list[tuple[int, str, int]]:
    """The concepts that occur in `concept_map` `(g, g)`: `(row, name, patches)`, most patches first."""
    rows, counts = np.unique(concept_map, return_counts=True)
    order = sorted(zip(rows.tolist(), counts.tolist()), key=lambda item: (-item[1], item[0]))
    return [(row, names[row], count) for row, count in order]


# ----------------------------------------------------------------------------------------------------------------
# Model → Explanation
def forward_with_attentions(model, **inputs):
    """`model(**inputs, output_attentions=True)` under eager attention, the implementation that returns the weights.

    The model's own implementation (SDPA by default) is put back afterwards.
    """
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation(implementation)


def explain_image(model, processor, image, max_new_tokens: int = 20) -> Explanation:
    """Caption `image` greedily and collect its attentions in an [`Explanation`].

    The attention of the position that predicted token t (position t - 1 of `BOS + tokens`) is what the
    explanation shows for token t, so the teacher-forced input is BOS and every generated token but the last.

    Args:
        model: an FSGR-PMA model in eval mode (`FsgrPmaForConditionalGeneration` or its remote-code copy).
        processor: its processor (`FsgrPmaProcessor` or what `AutoProcessor` loads).
        image: one RGB PIL image.
        max_new_tokens: caption length limit.
    """
    if model.training:
        raise ValueError("explain_image needs the model in eval mode (call model.eval()): training mode would "
                         "sample concepts, apply dropout and write to the memory banks")
    config = model.config
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"].to(device)  # (1, 3, H, W)

    with torch.inference_mode():
        generated = model.generate(
            pixel_values=pixel_values, num_beams=1, do_sample=False, max_new_tokens=max_new_tokens
        )[0]  # (1 + new,)
        new = generated[1:].tolist()
        special = {config.eos_token_id, config.pad_token_id}
        end = next((i for i, token_id in enumerate(new) if token_id in special), len(new))
        token_ids = new[:end]
        inputs = generated[: max(1, len(token_ids))][None]  # (1, T): BOS + tokens[:-1]
        output = forward_with_attentions(model, pixel_values=pixel_values, input_ids=inputs, use_cache=False)
    seq_len = inputs.shape[1]

    heatmaps = patch_heatmaps(output.cross_attentions, config.num_patches)[: len(token_ids)]  # (T, g, g)
    memory_mass, prototype_mass = memory_usage(output.decoder_attentions, seq_len)  # (L,), (L, m)
    if not config.use_memory:
        status = MEMORY_OFF
    elif prototype_mass.shape[-1] == 0:
        status = MEMORY_NOT_REFRESHED
    else:
        status = MEMORY_ACTIVE

    concept_map = None
    if output.patch_concepts is not None:
        concept_map = output.patch_concepts[0].reshape(config.grid_size, config.grid_size).cpu().numpy()  # (g, g)
    names = list(config.concept_names or [])
    if len(names) != config.num_concepts:
        names = [f"concept {row}" for row in range(config.num_concepts)]

    image_processor = processor.image_processor
    return Explanation(
        caption=processor.batch_decode([token_ids], skip_special_tokens=True)[0].strip(),
        tokens=token_texts(tokenizer, token_ids),
        token_ids=np.asarray(token_ids, dtype=np.int64),
        image=model_view(pixel_values[0], image_processor.image_mean, image_processor.image_std),
        heatmaps=heatmaps,
        concept_map=concept_map,
        concept_names=names,
        concepts_used=bool(config.use_fsgr),
        memory_status=status,
        memory_mass=memory_mass,
        prototype_mass=prototype_mass,
    )


# ----------------------------------------------------------------------------------------------------------------
# Explanation → figure
WORD_COLUMNS = 7
TOP_PROTOTYPES = 8


def plot_explanation(explanation: Explanation, path: str | Path, max_words: int = 2 * WORD_COLUMNS) -> Path:
    """Draw `explanation` as one PNG figure and write it to `path`.

    Top: the model's view of the image and, for each of the first `max_words` tokens, its cross-attention heatmap
    over the image. Bottom: the patch → concept map with a legend, the share of self-attention on the prototypes
    per decoder layer, and the prototypes that get most of it. Renders with the Agg canvas of a bare `Figure`,
    so neither pyplot's global state nor the caller's matplotlib backend is touched.
    """
    from matplotlib.figure import Figure

    words = min(len(explanation.tokens), max_words)
    word_rows = max(2, math.ceil(words / WORD_COLUMNS))
    fig = Figure(figsize=(15, 1.85 * word_rows + 3.9), dpi=110, layout="constrained")
    fig.suptitle(f"\u201c{explanation.caption}\u201d", fontsize=14)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.85 * word_rows, 3.6], hspace=0.04)

    grid = top.add_gridspec(word_rows, WORD_COLUMNS + 2)
    image_ax = top.add_subplot(grid[:2, :2])
    _draw_image(image_ax, explanation.image)
    image_ax.set_title("model input", fontsize=10)
    for index in range(word_rows * WORD_COLUMNS):
        ax = top.add_subplot(grid[index // WORD_COLUMNS, 2 + index % WORD_COLUMNS])
        if index < words:
            _draw_heatmap(ax, explanation, index)
        else:
            ax.axis("off")
            if index == 0:
                ax.text(0.5, 0.5, "no words generated", ha="center", va="center", fontsize=10)
    hidden = len(explanation.tokens) - words
    more = f"; {hidden} more word{'s' * (hidden > 1)} not shown" if hidden > 0 else ""
    top.supxlabel(
        "each word: cross-attention of the position that predicted it onto the patches, mean over decoder layers "
        f"and heads (colour scale per word){more}",
        fontsize=8, color="0.35",
    )

    panels = bottom.subplots(1, 3, width_ratios=[1.5, 0.55, 1.3])
    _draw_concepts(panels[0], explanation)
    _draw_memory(panels[1], panels[2], explanation)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")  # a bare Figure saves through the Agg canvas
    logger.info("wrote %s", path)
    return path


def _draw_image(ax, image: np.ndarray) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _extent(image: np.ndarray) -> tuple[float, float, float, float]:
    """imshow extent that lays a patch grid exactly over `image` `(H, W, 3)`."""
    height, width = image.shape[:2]
    return (-0.5, width - 0.5, height - 0.5, -0.5)


def _draw_heatmap(ax, explanation: Explanation, index: int) -> None:
    """One token: its patch attention (own colour scale, one cell per patch) over the image."""
    heatmap = explanation.heatmaps[index]  # (g, g)
    _draw_image(ax, explanation.image)
    ax.imshow(heatmap, cmap="inferno", alpha=0.7, extent=_extent(explanation.image), vmin=0.0,
              vmax=max(float(heatmap.max()), 1e-6), interpolation="nearest")
    share = float(heatmap.sum())
    detail = f"peak {heatmap.max():.0%}" + (f", on patches {share:.0%}" if share < 0.995 else "")
    ax.set_title(explanation.tokens[index], fontsize=11, pad=3)
    ax.set_xlabel(detail, fontsize=7, color="0.35", labelpad=2)


def _draw_concepts(ax, explanation: Explanation) -> None:
    """Patch → concept colours over the grey image, with a legend of the concepts that occur (and their patches)."""
    if explanation.concept_map is None:
        ax.axis("off")
        ax.text(0.5, 0.5, "no patch concepts\n(the model gives none)", ha="center", va="center", fontsize=10)
        return
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    legend = concept_legend(explanation.concept_map, explanation.concept_names)
    colour_of = concept_colours(legend, colormaps["tab20" if len(legend) > 10 else "tab10"])
    colours = np.array([[colour_of[row] for row in line] for line in explanation.concept_map.tolist()])  # (g, g, 3)
    grid = explanation.grid_size
    height, width = explanation.image.shape[:2]

    ax.imshow(explanation.image.mean(-1), cmap="gray", vmin=0, vmax=255, interpolation="nearest")  # (H, W)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.imshow(colours, alpha=0.6, extent=_extent(explanation.image), interpolation="nearest")
    for edge in range(1, grid):  # patch borders
        ax.axhline(edge * height / grid - 0.5, color="white", lw=0.5, alpha=0.7)
        ax.axvline(edge * width / grid - 0.5, color="white", lw=0.5, alpha=0.7)
    note = "" if explanation.concepts_used else "\n(use_fsgr=False: the decoder does not read it)"
    ax.set_title(f"patch \u2192 concept ({grid}\u00d7{grid} patches){note}", fontsize=10)
    handles = [Patch(color=colour_of[row], label=f"{name} ({count})") for row, name, count in legend]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.03, 0.5), fontsize=9, frameon=False,
              title="concept (patches)", title_fontsize=9, ncol=1 if len(handles) <= 12 else 2)


def concept_colours(legend: Sequence[tuple[int, str, int]], palette) -> dict[int, tuple[float, float, float]]:
    """One RGB colour per legend row: a concept whose first word is a colour ("red circle", "beige background") is
    drawn in that colour, so a wrong assignment is visible at a glance; the others take the next `palette` colour."""
    from matplotlib.colors import is_color_like, to_rgb

    colours, next_colour = {}, 0
    for row, name, _ in legend:
        word = name.split(" ")[0]
        if word.isalpha() and is_color_like(word):
            colours[row] = to_rgb(word)
        else:
            colours[row] = to_rgb(palette(next_colour % palette.N))
            next_colour += 1
    return colours


def _draw_memory(mass_ax, prototype_ax, explanation: Explanation) -> None:
    """Self-attention share on the prototypes per layer (stacked bars), and the top prototypes per layer."""
    if explanation.memory_status != MEMORY_ACTIVE:
        message = {
            MEMORY_OFF: "memory off\n(use_memory=False)",
            MEMORY_NOT_REFRESHED: "prototypes not refreshed\n(memory on, no K-Means refresh yet)",
        }[explanation.memory_status]
        mass_ax.axis("off")
        prototype_ax.axis("off")
        prototype_ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11)
        prototype_ax.set_title("prototype memory", fontsize=10)
        return

    layers = np.arange(len(explanation.memory_mass))
    labels = [f"layer {layer + 1}" for layer in layers]
    mass = explanation.memory_mass  # (L,)
    mass_ax.bar(layers, mass, color="tab:purple", label="prototypes")
    mass_ax.bar(layers, 1 - mass, bottom=mass, color="0.88", label="caption tokens")
    for layer, value in zip(layers, mass):
        mass_ax.text(layer, value / 2, f"{value:.0%}", ha="center", va="center", fontsize=9, color="white")
    mass_ax.set_xticks(layers, labels, fontsize=8)
    mass_ax.set_ylim(0, 1)
    mass_ax.set_ylabel("share of self-attention", fontsize=9)
    mass_ax.set_title("memory use", fontsize=10)
    mass_ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)

    per_prototype = explanation.prototype_mass  # (L, m)
    top = min(TOP_PROTOTYPES, per_prototype.shape[1])
    order = np.argsort(-per_prototype, axis=1, kind="stable")[:, :top]  # (L, top)
    values = np.take_along_axis(per_prototype, order, axis=1)  # (L, top)
    vmax = max(float(values.max()), 1e-6)
    prototype_ax.imshow(values, cmap="Purples", vmin=0, vmax=vmax, aspect="auto")
    for layer in layers:
        for rank in range(top):
            colour = "white" if values[layer, rank] > 0.6 * vmax else "black"
            prototype_ax.text(rank, layer, f"#{order[layer, rank]}\n{values[layer, rank]:.1%}", ha="center",
                              va="center", fontsize=8, color=colour)
    prototype_ax.set_yticks(layers, labels, fontsize=8)
    prototype_ax.set_xticks(range(top), [str(rank + 1) for rank in range(top)], fontsize=8)
    prototype_ax.set_xlabel("rank  (cell: prototype id, share of self-attention)", fontsize=8)
    prototype_ax.set_title(f"most used prototypes (top {top} of {per_prototype.shape[1]} per layer)", fontsize=10)


__all__ = [
    "Explanation",
    "concept_colours",
    "concept_legend",
    "explain_image",
    "memory_usage",
    "model_view",
    "patch_heatmaps",
    "plot_explanation",
    "token_texts",
]
