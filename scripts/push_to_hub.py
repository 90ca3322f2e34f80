"""Publish a trained model to the Hugging Face Hub: weights with prototypes and codebook, code, processor, card.

Usage:

    python scripts/push_to_hub.py --model outputs/demo/model --repo-id USER/fsgr-pma-scenes \
        --metrics outputs/demo/metrics_test.json outputs/demo/metrics_test_novel.json

`--dry-run DIR` writes exactly the folder that would be uploaded and touches no network. The folder holds
`model.safetensors` (LoRA merged into plain tower weights), `config.json` with `auto_map`, the remote-code files,
the processor and tokenizer files, `generation_config.json` and `README.md`, a model card built with
huggingface_hub's `ModelCard` from `model_cards/fsgr_pma.md`, with a `model-index` from the `evaluate_captions.py` JSON.
The upload uses `HfApi.upload_folder` and the token from the usual huggingface_hub sources (never printed).

A Space that demonstrates the model (the web demo `scripts/app.py`, run by Gradio):

    python scripts/push_to_hub.py --space USER/fsgr-pma-demo --repo-id USER/fsgr-pma-scenes --dry-run outputs/space
    python outputs/space/app.py --model outputs/demo/model    # try that folder here, on a local model

With `--space`, the Space is written (or uploaded) instead of the model; `--repo-id` is the model it loads and
`--model` is not needed. The folder holds `app.py` (a copy of `scripts/app.py`), the `modeling_fsgr_pma` package
it imports, the example images (`app_examples/`), a `requirements.txt` pinning this project's dependencies to the
versions installed here, and a `README.md` whose metadata (huggingface_hub's `SpaceCard`) says `sdk: gradio`, the
Gradio version, `app_file: app.py` and `models: [REPO_ID]`: the model `app.py` loads when it is given no `--model`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, SpaceCard, SpaceCardData
from packaging.requirements import Requirement
from transformers import AutoModel, AutoProcessor

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "model_cards" / "fsgr_pma.md"
SPACE_FILES = {ROOT / "scripts" / "app.py": "app.py", ROOT / "scripts" / "app_examples": "app_examples",
               ROOT / "modeling_fsgr_pma": "modeling_fsgr_pma"}
SCENE_WORLD = (
    "The bundled synthetic scene world (`scripts/make_synthetic.py`): procedurally drawn scenes (park, beach, kitchen "
    "table, street, night, snow, living room) with 1–5 kinds of object among 49 categories (people, animals, "
    "vehicles, furniture, food, ...) drawn as simple icons, with colours, sizes, patterns, counts and spatial "
    "relations, and five grammar-written captions each. The model knows only this world: a photo gets a caption made "
    "of its categories and scenes."
)
CARD_METRICS = {"CIDEr": "cider", "Bleu_4": "bleu", "METEOR": "meteor", "ROUGE_L": "rouge", "SPICE": "spice"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="directory written by train.py (save_pretrained)")
    parser.add_argument("--repo-id", required=True, help="USER/NAME on the Hub (with --space: the model it loads)")
    parser.add_argument("--space", default=None, metavar="USER/NAME",
                        help="write or upload a Gradio Space running scripts/app.py on --repo-id, not the model")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", default=None, help="branch to upload to (created if missing)")
    parser.add_argument("--dry-run", type=Path, default=None, help="write the upload folder here; no network")
    parser.add_argument("--metrics", type=Path, nargs="*", default=[], help="evaluate_captions.py JSON files")
    parser.add_argument("--dataset-name", default="synthetic-scenes", help="dataset named in the model-index")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--training-data", default=SCENE_WORLD,
                        help="the card's Training data paragraph, shown by the CLI and the app (default: the scene world)")
    parser.add_argument("--training-command", default="python scripts/demo.py")
    args = parser.parse_args(argv)
    for flag, repo in (("--repo-id", args.repo_id), ("--space", args.space)):
        if repo is not None and "/" not in repo:
            parser.error(f"{flag} must look like USER/NAME, got {repo!r}")
    if args.space is None and args.model is None:
        parser.error("--model is required (unless --space writes a Space for --repo-id)")
    for path in args.metrics:
        if not path.is_file():
            parser.error(f"--metrics {path} does not exist (write it with scripts/evaluate_captions.py)")
    return args


def eval_results(metric_files: list[Path], dataset_name: str) -> tuple[list[EvalResult], str, dict]:
    """model-index entries, a markdown table, and the decoding settings of the evaluate_captions.py files."""
    results, rows, decoding = [], [], {}
    for path in metric_files:
        metrics = json.loads(path.read_text())
        decoding = {name: metrics[name] for name in ("num_beams", "max_new_tokens", "no_repeat_ngram_size")
                    if name in metrics}
        for name, card_name in CARD_METRICS.items():
            if isinstance(metrics.get(name), float):
                results.append(EvalResult(
                    task_type="image-to-text", dataset_type=dataset_name, dataset_name=dataset_name,
                    dataset_split=metrics["split"], metric_type=card_name, metric_name=name,
                    metric_value=round(metrics[name], 4),
                ))
        cells = [f"{metrics[n]:.3f}" if isinstance(metrics.get(n), float) else "skipped" for n in CARD_METRICS]
        # The share of named objects that are not in the image: CHAIRi on the scene world, the shape world's rate.
        hallucination = metrics.get("chair_i", metrics.get("hallucination_rate"))
        cells.append(f"{hallucination:.3f}" if isinstance(hallucination, float) else "n/a")
        rows.append(f"| {metrics['split']} ({metrics['num_images']} images) | " + " | ".join(cells) + " |")
    header = "| split | " + " | ".join(CARD_METRICS) + " | objects not in the image (CHAIRi) |"
    table = "\n".join([header, "|" + "---|" * (len(CARD_METRICS) + 2), *rows]) if rows else "Not evaluated."
    return results, table, decoding


def build_card(model, args: argparse.Namespace) -> ModelCard:
    config = model.config
    results, table, decoding = eval_results(args.metrics, args.dataset_name)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-to-text",
        base_model=f"open_clip/{config.clip_model_name}" if config.clip_model_name else None,
        datasets=[args.dataset_name],
        license=args.license,
        tags=["image-captioning", "fsgr-pma", "custom_code"],
        model_name=args.repo_id.split("/")[-1],
        eval_results=results or None,
    )
    generation = model.generation_config
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=args.repo_id.split("/")[-1],
        repo_id=args.repo_id,
        revision=args.revision or "main",
        num_beams=decoding.get("num_beams", generation.num_beams),
        max_new_tokens=decoding.get("max_new_tokens", generation.max_new_tokens),
        repetition=repetition_description(decoding.get("no_repeat_ngram_size", generation.no_repeat_ngram_size or 0)),
        training_data=args.training_data,
        clip_model_name=config.clip_model_name or "custom open_clip ViT",
        image_size=config.image_size,
        num_concepts=config.num_concepts,
        concept_top_k=config.concept_top_k,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_prototypes=config.num_prototypes if config.use_memory else 0,
        memory_description=memory_description(config),
        num_parameters=f"{model.num_parameters():,}",
        evaluation=table,
        training_command=args.training_command,
        limitations=(
            "Trained and evaluated on the data named above only; captions of images far from it are unreliable. "
            "The prototypes summarise the training captions and can carry their biases into new captions."
        ),
    )


def repetition_description(no_repeat_ngram_size: int) -> str:
    """The card's words for `no_repeat_ngram_size` (chosen on the synthetic test split: docs/results.md)."""
    if not no_repeat_ngram_size:
        return "no limit on repeated words"
    return (f"no {no_repeat_ngram_size} tokens said twice (`no_repeat_ngram_size`: it stops loops such as `a red car "
            "and a red car and a red car`; the repository's `docs/results.md` has the measurement)")


def memory_description(config) -> str:
    """The model card's memory row: PMA-Net's settings, and our extension where it is on."""
    if not config.use_memory:
        return "off (a plain Transformer decoder)"
    text = (f"PMA-Net: banks of the last {config.memory_window} steps, K-Means refreshed every "
            f"{config.memory_refresh_every} steps; the released prototypes are those of the last training steps")
    if config.memory_prior:
        text += ("; *our extension*: a learned per-head log-prior on the prototype logits (`memory_prior`, "
                 "initialised at -log m)")
    return text


def write_folder(model, processor, card: ModelCard, folder: Path) -> None:
    if not model.config.lora_merged and model.config.lora_rank > 0:
        model.merge_encoder_lora()  # publish plain tower weights that a later PEFT fine-tune can adapt again
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    card.save(folder / "README.md")


# ----------------------------------------------------------------------------------------------------------------
# Space
def pinned_requirements(distribution: str = "fsgr-pma") -> list[str]:
    """This project's dependencies (no extras), each pinned to the version installed in this environment."""
    pins = []
    for line in importlib.metadata.requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an extra (cpu, gpu, dev): K-Means backends and test tools the demo does not use
        pins.append(f"{requirement.name}=={importlib.metadata.version(requirement.name)}")
    return pins


def build_space_card(args: argparse.Namespace) -> SpaceCard:
    import gradio

    card_data = SpaceCardData(
        title="FSGR-PMA image captioning",
        emoji="🖼️",
        colorFrom="indigo",
        colorTo="purple",
        sdk="gradio",
        sdk_version=gradio.__version__,
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        app_file="app.py",
        pinned=False,
        license=args.license,
        models=[args.repo_id],
        short_description="Caption images and see what the model looked at",
        tags=["image-captioning", "fsgr-pma"],
    )
    text = (
        f"# FSGR-PMA image captioning\n\n"
        f"A web demo of [{args.repo_id}](https://huggingface.co/{args.repo_id}): upload or drop images, choose the "
        "beam size and maximum length, and read each caption; tick *Explain* to see the figure of what the model "
        "looked at (per-word cross-attention, patch → concept map, prototype use).\n\n"
        "`app.py` is `scripts/app.py` of the FSGR-PMA repository, and `modeling_fsgr_pma/` the package it imports. "
        "It loads the model named under `models:` above; run it elsewhere with\n\n"
        "```bash\npip install -r requirements.txt\npython app.py [--model DIR_OR_REPO]\n```\n"
    )
    return SpaceCard(f"---\n{card_data.to_yaml()}\n---\n\n{text}")


def write_space(args: argparse.Namespace, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for source, name in SPACE_FILES.items():
        if source.is_dir():
            shutil.copytree(source, folder / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, folder / name)
    requirements = "\n".join(pinned_requirements())
    (folder / "requirements.txt").write_text(f"# pinned by scripts/push_to_hub.py --space\n{requirements}\n")
    build_space_card(args).save(folder / "README.md")


def publish(args: argparse.Namespace, write: Callable[[Path], None], repo_id: str, repo_type: str, what: str,
            **create_kwargs) -> Path | str:
    """Write the folder to `--dry-run`, or create the repo (and `--revision` branch) and upload the folder."""
    if args.dry_run is not None:
        write(args.dry_run)
        logger.info("dry run: wrote the upload folder to %s", args.dry_run)
        return args.dry_run
    api = HfApi()
    api.create_repo(repo_id, repo_type=repo_type, private=args.private, exist_ok=True, **create_kwargs)
    if args.revision:
        api.create_branch(repo_id, repo_type=repo_type, branch=args.revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        write(Path(staging))
        commit = api.upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=staging, revision=args.revision,
                                   commit_message=f"Upload {what}")
    logger.info("uploaded to %s", commit.commit_url)
    return commit.commit_url


def main(argv: list[str] | None = None) -> Path | str:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.space is not None:
        return publish(args, lambda folder: write_space(args, folder), args.space, "space", "the FSGR-PMA demo",
                       space_sdk="gradio")
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    card = build_card(model, args)
    return publish(args, lambda folder: write_folder(model, processor, card, folder), args.repo_id, "model",
                   "FSGR-PMA model")


if __name__ == "__main__":
    main()
