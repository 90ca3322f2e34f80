"""A web demo of an FSGR-PMA model: caption uploaded images and, on request, draw what the model looked at.

Usage:

    python scripts/app.py --model outputs/demo/model [--adapter outputs/demo/peft] [--port 7860]

then open http://127.0.0.1:7860. `--model` takes a saved model directory or a Hub repo id; without it the app
loads the first model named under `models:` in a `README.md` next to this file (the Space metadata that
`scripts/push_to_hub.py --space` writes), so a Space runs it as `python app.py`. The examples are the images in
`--examples` (default `app_examples/` next to this file: four `test_novel` images of the scene world that
`scripts/demo.py` generates with its defaults, 4,000 images and seed 0).

The header says what the model was trained on (its model card's "Training data" section), so a visitor who uploads
a photo to the demo model, which knows only the scene world, reads why the caption names its icons and scenes. A visitor
uploads or drops images (or clicks a bundled example), sets the beam size and the maximum caption length
and presses **Caption**. Every upload gets its caption, or the error text `fsgr-pma caption` prints for that file
(`modeling_fsgr_pma.data.captions.decode_image`); nothing a visitor uploads raises in the server. With **Explain** ticked,
each good image also gets the `fsgr-pma explain` figure (`modeling_fsgr_pma.cli.explain`) for its greedy caption.

Captioning runs in Gradio's queue as a batch function: up to `--max-batch-size` visitors' requests waiting in the
queue are taken together, their images pooled per (beam size, length) setting and captioned in batches of
`--batch-size` images. The model loads once, before the server starts, and one caption and one explain figure are
made on a blank image then, so the first visitor does not pay for the first call's set-up. The log gives the
start-up times (`ready ... after start`). Gradio's telemetry and version check are switched off; the page loads
nothing from outside the server.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

START = time.perf_counter()  # start-up times in the log are measured from here (after the standard library)

import gradio as gr  # noqa: E402  (timed from START)
import torch  # noqa: E402
from huggingface_hub import SpaceCard  # noqa: E402
from PIL import Image  # noqa: E402

from modeling_fsgr_pma.cli.main import Result, caption_images, error_reason, load_image  # noqa: E402
from modeling_fsgr_pma.data.captions import BadImageError  # noqa: E402
from modeling_fsgr_pma.cli.explain import explain_image, plot_explanation  # noqa: E402
from modeling_fsgr_pma.cli.loading import ModelLoadError, load_pretrained, looks_like_path, training_data  # noqa: E402

logger = logging.getLogger("fsgr_pma.app")

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE / "app_examples"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MAX_BEAMS = 8
MAX_FILE_SIZE = "20mb"  # per upload


# ----------------------------------------------------------------------------------------------------------------
# Arguments
def space_model(readme: Path) -> str | None:
    """The first model a Space's README metadata names (`models:`), or None without one."""
    if not readme.is_file():
        return None
    models = SpaceCard.load(readme).data.models or []
    return models[0] if models else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=space_model(HERE / "README.md"), metavar="DIR_OR_REPO",
                        help="a saved model directory or Hub repo id (default: the models: entry of README.md here)")
    parser.add_argument("--revision", default=None, metavar="REV", help="Hub revision (branch, tag or commit)")
    parser.add_argument("--adapter", default=None, metavar="DIR", help="PEFT adapter from scripts/finetune_peft.py")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to serve on (127.0.0.1; a Space sets GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--batch-size", type=int, default=16, help="images per generate() call (16)")
    parser.add_argument("--max-batch-size", type=int, default=4,
                        help="visitors' requests taken from the queue together (4)")
    parser.add_argument("--max-images", type=int, default=8, help="images per request (8)")
    parser.add_argument("--max-pixels", type=int, default=25_000_000, help="refuse larger images (25 MP)")
    parser.add_argument("--examples", type=Path, default=EXAMPLES, help="folder of example images")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("--model is required (a saved model directory or a Hub repo id)")
    for name in ("batch_size", "max_batch_size", "max_images", "max_pixels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available; use --device cpu")
    return args


# ----------------------------------------------------------------------------------------------------------------
# What the page shows
def escape_markdown(text: str) -> str:
    r"""Backslash-escape Markdown's special characters, so a file named `a_b*.png` shows as it is."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", text)


def results_markdown(results: list[Result]) -> str:
    """One bullet per upload, in upload order: its caption, or `ERROR: reason` as `fsgr-pma caption` prints it."""
    lines = []
    for result in results:
        name = f"**{escape_markdown(result.file)}**"
        if result.error is not None:
            lines.append(f"- {name}: ⚠️ ERROR: {escape_markdown(result.error)}")
        else:
            lines.append(f"- {name}: {escape_markdown(result.caption) if result.caption else '*(empty caption)*'}")
    return "\n".join(lines)


def upload_paths(gallery: list[tuple[str, str | None]] | None) -> list[str]:
    """File paths of a Gallery(type="filepath") value, `[(path, caption), ...]` (None when empty)."""
    return [path for path, _ in gallery or []]


def model_description(model_id: str, config, num_parameters: int, trained_on: str) -> str:
    """Title, what the model is, what it was trained on, and where it comes from: a link to its card on the Hub, or
    its local directory. `trained_on` is its card's training data (`modeling_fsgr_pma.cli.loading.training_data`):
    a visitor who uploads a photo to a model of the scene world reads why the caption names its icons."""
    if looks_like_path(model_id):
        source = f"`{model_id}` (local directory)"
    else:
        source = f"[{model_id}](https://huggingface.co/{model_id}) (model card)"
    memory = f"{config.num_prototypes} prototypes per layer" if config.use_memory else "no prototype memory"
    return (
        "# FSGR-PMA image captioning\n"
        "A CLIP ViT whose patches are quantised onto a codebook of concept embeddings and fused back by "
        "cross-attention (FSGR, Gao et al., TCSVT 2025), with a caption decoder whose self-attention also reads "
        "prototypes of its own past activations (PMA-Net, Barraco et al., ICCV 2023).\n\n"
        f"**Model:** {source} · "
        f"{num_parameters:,} parameters · {config.image_size}-px input · {config.num_concepts} concepts · "
        f"{memory}.\n\n"
        f"**Trained on:** {trained_on} It can only name what it saw there.\n\n"
        "Upload or drop images, or click an example, then press **Caption**."
    )


# ----------------------------------------------------------------------------------------------------------------
# The model behind the page
class Captioner:
    """The loaded model and the two functions the page calls: batched captioning and explain figures."""

    def __init__(self, model, processor, device: str, batch_size: int, max_images: int, max_pixels: int):
        self.model, self.processor, self.device = model, processor, device
        self.batch_size, self.max_images, self.max_pixels = batch_size, max_images, max_pixels
        self.max_new_tokens_limit = model.config.max_position_embeddings
        generation = model.generation_config
        self.default_beams = min(generation.num_beams or 3, MAX_BEAMS)
        self.default_length = min(generation.max_new_tokens or 20, self.max_new_tokens_limit)

    def refusal(self, paths: list[str]) -> str | None:
        """Why a request is not captioned at all (no images, too many), or None."""
        if not paths:
            return "Upload or drop an image, or click an example, then press **Caption**."
        if len(paths) > self.max_images:
            return f"⚠️ {len(paths)} images: this demo captions at most {self.max_images} at a time."
        return None

    def length(self, max_new_tokens: float) -> int:
        """The length slider's value, kept within what the decoder can read."""
        return min(max(int(max_new_tokens), 1), self.max_new_tokens_limit)

    def read(self, paths: list[str]) -> tuple[list[Result], list[tuple[int, Image.Image]]]:
        """Decode uploads as the CLI does: results named by file name, errors filled in, good images by index."""
        results, good = [Result(file=Path(path).name) for path in paths], []
        for index, path in enumerate(paths):
            try:
                good.append((index, load_image(path, self.max_pixels)))
            except BadImageError as error:
                results[index].error = error_reason(error, path)
        return results, good

    def caption_batch(self, galleries: list[list | None], beams: list[float], lengths: list[float]) -> list[list[str]]:
        """Gradio batch function: lists of every queued request's inputs in, one list per output back.

        The images of all requests with the same (beam size, length) are captioned together, in batches of
        `batch_size` images; each request gets its own Markdown list of captions and errors.
        """
        started = time.perf_counter()
        requests: list[str | list[Result]] = []  # per request: a refusal, or its results (filled in below)
        pooled: dict[tuple[int, int], list[tuple[Result, Image.Image]]] = {}
        for gallery, num_beams, max_new_tokens in zip(galleries, beams, lengths):
            paths = upload_paths(gallery)
            refusal = self.refusal(paths)
            if refusal is not None:
                requests.append(refusal)
                continue
            results, good = self.read(paths)
            setting = (min(max(int(num_beams), 1), MAX_BEAMS), self.length(max_new_tokens))
            pooled.setdefault(setting, []).extend((results[index], image) for index, image in good)
            requests.append(results)
        for (num_beams, max_new_tokens), members in pooled.items():
            if not members:
                continue
            captions = caption_images(self.model, self.processor, [image for _, image in members], self.batch_size,
                                      num_beams, max_new_tokens, self.device)
            for (result, _), caption in zip(members, captions):
                result.caption = caption
        logger.info("captioned %d request(s), %d image(s), in %.2f s", len(galleries),
                    sum(len(members) for members in pooled.values()), time.perf_counter() - started)
        return [[item if isinstance(item, str) else results_markdown(item) for item in requests]]

    def explain_figures(self, gallery: list[tuple[str, str | None]] | None, max_new_tokens: float, wanted: bool,
                        progress: gr.Progress = gr.Progress()) -> dict[str, Any]:
        """The explain figure of every good upload (greedy caption), as a Gallery update; hidden when not wanted.

        Hidden means `visible="hidden"`: out of the layout but in the page, so its progress indicator can be seen.
        """
        paths = upload_paths(gallery)
        if not wanted or self.refusal(paths) is not None:
            return gr.update(value=None, visible="hidden")
        results, good = self.read(paths)
        figures = []
        for index, image in progress.tqdm(good, desc="explaining"):
            explanation = explain_image(self.model, self.processor, image, max_new_tokens=self.length(max_new_tokens))
            figures.append((render_figure(explanation), f"{results[index].file}: “{explanation.caption}”"))
        return gr.update(value=figures, selected_index=0 if figures else None, visible=True if figures else "hidden")

    def warm_up(self) -> tuple[float, float]:
        """One caption and one explain figure of a blank image: the first call's one-off costs, paid at start.

        Returns:
            the seconds the caption and the figure took.
        """
        blank = Image.new("RGB", (self.model.config.image_size,) * 2, "white")
        started = time.perf_counter()
        caption_images(self.model, self.processor, [blank], 1, self.default_beams, self.default_length, self.device)
        captioned = time.perf_counter()
        render_figure(explain_image(self.model, self.processor, blank, max_new_tokens=self.default_length))
        return captioned - started, time.perf_counter() - captioned


def render_figure(explanation) -> Image.Image:
    """`plot_explanation` as a PIL image (drawn into a temporary file, which is removed)."""
    with tempfile.TemporaryDirectory() as folder:
        path = plot_explanation(explanation, Path(folder) / "explain.png")
        with Image.open(path) as figure:
            return figure.convert("RGB")


def example_images(folder: Path) -> list[str]:
    if not folder.is_dir():
        logger.warning("no example folder %s: the page shows no examples", folder)
        return []
    return sorted(str(path) for path in folder.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------------------------------------------
# The page
def build_demo(captioner: Captioner, model_id: str, examples: list[str], max_batch_size: int, trained_on: str,
               card: str | None = None) -> gr.Blocks:
    """The Gradio page: inputs and examples on the left, captions and explain figures on the right.

    Both columns are at least 320 px wide, so a phone-sized window stacks them.
    """
    config = captioner.model.config
    with gr.Blocks(title="FSGR-PMA image captioning", analytics_enabled=False) as demo:
        gr.Markdown(model_description(model_id, config, captioner.model.num_parameters(), trained_on),
                    elem_id="description")
        if card is not None:
            with gr.Accordion("Model card", open=False):
                gr.Markdown(card)
        with gr.Row():
            with gr.Column(min_width=320):
                images = gr.Gallery(label="Images (upload or drop one or several)", type="filepath",
                                    interactive=True, columns=3, height=300, elem_id="images")
                with gr.Row():
                    beams = gr.Slider(1, MAX_BEAMS, value=captioner.default_beams, step=1, label="Beam size", min_width=140)
                    length = gr.Slider(1, captioner.max_new_tokens_limit, value=captioner.default_length, step=1,
                                       label="Maximum length (tokens)", min_width=140)
                explain = gr.Checkbox(label="Explain: draw what the model looked at (greedy caption)", value=False,
                                      elem_id="explain")
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                if examples:
                    gr.Examples([[[path]] for path in examples] + [[examples]], inputs=[images],
                                example_labels=[Path(path).stem for path in examples] + ["all of them"],
                                label="Examples (click to load)", cache_examples=False, elem_id="examples")
            with gr.Column(min_width=320):
                captions = gr.Markdown("Captions appear here.", label="Captions", container=True,
                                       elem_id="captions")
                figures = gr.Gallery(label="Explain figures (click one to enlarge)", visible="hidden", columns=1,
                                     object_fit="contain", format="png", elem_id="figures")
        button.click(
            captioner.caption_batch, inputs=[images, beams, length], outputs=[captions], batch=True,
            max_batch_size=max_batch_size, concurrency_id="model", concurrency_limit=1, show_progress="full",
            api_name="caption",
        ).then(
            captioner.explain_figures, inputs=[images, length, explain], outputs=[figures], concurrency_id="model",
            concurrency_limit=1, show_progress="full", api_name="explain",
        )
    return demo


def serve(demo: gr.Blocks, host: str, port: int) -> None:
    """Start the server in the background (return once it answers): no share link, no server-side rendering."""
    # Gradio's default font with Bold (700) in place of SemiBold (600), whose file in gradio 6.31 is a 5 KB subset
    # without most letters: bold text (titles, labels, buttons) would mix two fonts. A 600 asks for the 700 face.
    font = [gr.themes.LocalFont("Source Sans Pro", weights=(400, 700)), "ui-sans-serif", "system-ui", "sans-serif"]
    demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, max_file_size=MAX_FILE_SIZE,
                theme=gr.themes.Default(font=font), prevent_thread_lock=True, quiet=True)


def model_card(model_id: str) -> str | None:
    """A local model directory's README.md, shown in the page (a Hub model is linked instead)."""
    readme = Path(model_id).expanduser() / "README.md"
    if not looks_like_path(model_id) or not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8")
    return re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.DOTALL)  # drop the YAML metadata block


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "modeling_fsgr_pma.cli.explain"):  # a line per local HTTP call, per temporary figure file
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry, no version check against gradio.app
    imported = time.perf_counter()
    try:
        model, processor = load_pretrained(args.model, args.revision, args.adapter)
    except ModelLoadError as error:
        logger.error("%s", error)
        return 2
    model = model.to(args.device)
    loaded = time.perf_counter()
    captioner = Captioner(model, processor, args.device, args.batch_size, args.max_images, args.max_pixels)
    demo = build_demo(captioner, args.model, example_images(args.examples), args.max_batch_size,
                      training_data(args.model, args.revision), model_card(args.model))
    caption_s, explain_s = captioner.warm_up()
    logger.info("imports %.1f s, model %.1f s, warm-up caption %.2f s and explain figure %.2f s",
                imported - START, loaded - imported, caption_s, explain_s)
    serve(demo, args.host, args.port)
    logger.info("ready at http://%s:%d, %.1f s after start", args.host, args.port, time.perf_counter() - START)
    try:
        demo.block_thread()
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
