"""Load a trained model and its processor (and optionally a PEFT adapter) with errors that say what to do, and say
what the model was trained on (its model card's "Training data" section).

Used by the `fsgr-pma` CLI, the web app and the scripts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PROCESSOR_FILES = ("tokenizer.json", "processor_config.json")


class ModelLoadError(ValueError):
    """The model, its processor or its adapter could not be loaded; the message says why and what to do."""


def looks_like_path(model: str) -> bool:
    """A local path rather than a Hub id (`owner/name`): it exists, is absolute or relative-looking, or has >1 '/'."""
    return os.path.exists(model) or os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1


def check_local_model(model: str) -> None:
    """A local model directory must hold `config.json` and the processor files."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model directory not found: {model} (pass a directory written by model.save_pretrained(DIR) "
            "or a Hub repo id like owner/name)"
        )
    if not path.is_dir():
        raise ModelLoadError(f"the model must be a directory or a Hub repo id, got a file: {model}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{model}: no config.json; save the model with model.save_pretrained({model!r})")
    if not any((path / name).is_file() for name in PROCESSOR_FILES):
        raise ModelLoadError(
            f"{model}: no processor files (missing {' and '.join(PROCESSOR_FILES)}); "
            f"save the processor with processor.save_pretrained({model!r})"
        )


def load_pretrained(model: str, revision: str | None = None, adapter: str | None = None):
    """`AutoModel` + `AutoProcessor` (`trust_remote_code=True`), then the adapter merged in when given.

    Returns:
        `(model, processor)`, the model in eval mode on the CPU.

    Raises:
        ModelLoadError: a missing directory or repo, missing processor files, or an adapter that does not fit.
    """
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import AutoModel, AutoProcessor

    model = str(model)
    if looks_like_path(model):
        check_local_model(model)
        model = str(Path(model).expanduser())
    kwargs = dict(revision=revision, trust_remote_code=True)
    what = "model"
    try:
        network = AutoModel.from_pretrained(model, **kwargs)
        what = "processor"
        processor = AutoProcessor.from_pretrained(model, **kwargs)
    except (OSError, ValueError, HfHubHTTPError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = (
            "save the processor with processor.save_pretrained(DIR) next to the model"
            if what == "processor"
            else "check the directory or repo id, and the revision"
        )
        raise ModelLoadError(f"could not load the {what} from {model}: {first} ({hint})") from error
    if not callable(getattr(processor, "batch_decode", None)) or getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(
            f"{model}: loaded a {type(processor).__name__}, not an image+text processor; "
            "save the processor with processor.save_pretrained(DIR)"
        )
    if adapter is not None:
        from ..training.adapters import load_adapter

        try:
            network = load_adapter(network, adapter).merge_and_unload()
        except ValueError as error:
            raise ModelLoadError(str(error)) from error
    return network.eval(), processor


UNKNOWN_TRAINING_DATA = "unknown (the model has no model card, README.md, with a '## Training data' section)"


def training_data(model: str, revision: str | None = None) -> str:
    """What the model was trained on: the first paragraph of the `## Training data` section of its model card.

    The card is `README.md` in the model directory or Hub repo (`scripts/push_to_hub.py` and `scripts/demo.py`
    write it from `model_cards/fsgr_pma.md`); without one, or without that section, the card's `datasets:` metadata,
    else `UNKNOWN_TRAINING_DATA`. The CLI prints it first and the web app shows it in its header, so that a user who
    captions a photo with a model of the scene world is told why the caption names its icons and scenes.
    """
    from huggingface_hub import ModelCard, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    model = str(model)
    if looks_like_path(model):
        readme = Path(model).expanduser() / "README.md"
    else:
        try:
            readme = Path(hf_hub_download(model, "README.md", revision=revision))
        except (OSError, ValueError, HfHubHTTPError):
            return UNKNOWN_TRAINING_DATA
    if not readme.is_file():
        return UNKNOWN_TRAINING_DATA
    card = ModelCard.load(readme)
    section = re.search(r"^## Training data[ \t]*\n+(.+?)(?:\n\s*\n|\Z)", card.text, flags=re.MULTILINE | re.DOTALL)
    if section:
        return " ".join(section.group(1).split())
    datasets = card.data.datasets
    return ", ".join(datasets) if datasets else UNKNOWN_TRAINING_DATA
