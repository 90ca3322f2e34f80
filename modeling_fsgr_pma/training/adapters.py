"""PEFT LoRA adapters for a trained FSGR-PMA model: build, save and load them with clear errors.

`scripts/finetune_peft.py` writes an adapter directory: PEFT's `adapter_model.safetensors` and
`adapter_config.json`, plus `fsgr_pma_base.json` (which base model it was trained on) and, when the prototype
memory was refreshed on the new domain, `prototypes.safetensors` (the refreshed prototype buffers, which are not
LoRA weights). `load_adapter` puts all of it back onto a freshly loaded base:

    base = AutoModel.from_pretrained(BASE, trust_remote_code=True)
    model = load_adapter(base, ADAPTER_DIR)          # a peft.PeftModel; .merge_and_unload() for a plain model
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

BASE_FILE = "fsgr_pma_base.json"
PROTOTYPES_FILE = "prototypes.safetensors"
# Tensors that identify a trained base: its vocabulary embeddings, its concept codebook and its patch embedding.
FINGERPRINT_TENSORS = ("decoder.embed_tokens.weight", "encoder.codebook.embeddings", "encoder.tower.visual.conv1.weight")
# Before the captioner held an `FsgrPmaModel` as `model`, its modules were `encoder.*` and `decoder.*`, and so are the
# names in adapters trained then (their weights and their `target_modules` pattern).
BASE_MODEL_PREFIX = "model."
KEYS_BEFORE_THE_BASE_MODEL = {r"^(encoder|decoder)\.": r"model.\1."}


def read_lora_config(path: str | Path) -> LoraConfig:
    """A `LoraConfig` from a JSON file of its fields (`configuration/lora/default.json`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LoRA config {path} does not exist (see configuration/lora/ for the shipped ones)")
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"LoRA config {path} is not valid JSON: {error}") from None
    peft_type = fields.pop("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"LoRA config {path} has peft_type {peft_type!r}; only LORA is supported")
    try:
        return LoraConfig(**fields)
    except TypeError as error:  # an unknown field name
        raise ValueError(f"LoRA config {path}: {error}") from None


def new_word_token_ids(captions: list[str], tokenizer) -> list[int]:
    """Ids of the tokens that spell words the tokenizer has no single token for (a new domain's vocabulary).

    Training these embedding rows (PEFT `trainable_token_indices`; the LM head is tied to them) lets the decoder
    learn to write new words that the base tokenizer can only spell in pieces.
    """
    pre_tokenize = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    words = {word for caption in captions for word, _ in pre_tokenize(caption.lower())}
    pieces = (tokenizer(word, add_special_tokens=False)["input_ids"] for word in sorted(words))
    return sorted({token for ids in pieces if len(ids) > 1 for token in ids})


def base_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the base model's identity (architecture and a few trained tensors).

    Names are hashed without the `model.` prefix, as they were before it existed, so adapters trained then still match.
    """
    state = {name.removeprefix(BASE_MODEL_PREFIX): tensor for name, tensor in model.state_dict().items()}
    digest = hashlib.sha256(json.dumps({k: list(v.shape) for k, v in state.items()}, sort_keys=True).encode())
    for name in FINGERPRINT_TENSORS:
        if name in state:
            digest.update(state[name].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def apply_lora(model: torch.nn.Module, lora_config: LoraConfig) -> PeftModel:
    """`get_peft_model`, with an error that shows the module names when the config matches none of them."""
    try:
        return get_peft_model(model, lora_config)
    except ValueError as error:
        if "not found in the base model" not in str(error) and "No modules were targeted" not in str(error):
            raise
        examples = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)][:6]
        raise ValueError(
            f"The LoRA config's target_modules {lora_config.target_modules!r} match no module of this model; "
            f"name modules as they appear in model.named_modules(), e.g. {examples}"
        ) from None


def is_prototype_buffer(name: str) -> bool:
    """Whether a state-dict name is a memory layer's prototype buffer (keys, values or ready flag)."""
    return ".prototype_" in name


def prototype_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The prototype buffers (keys, values, ready flags) of every memory layer, by state-dict name."""
    state = model.state_dict()
    return {name: tensor.detach().cpu().clone() for name, tensor in state.items() if is_prototype_buffer(name)}


def save_adapter(peft_model: PeftModel, directory: str | Path, base_name: str, fingerprint: str, memory: str) -> None:
    """Write the PEFT adapter, the base's identity and (memory "refresh") the refreshed prototypes."""
    directory = Path(directory)
    peft_model.save_pretrained(directory)
    info = {"base_model": base_name, "base_fingerprint": fingerprint, "memory": memory}
    (directory / BASE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if memory == "refresh":
        save_file(prototype_state(peft_model.get_base_model()), str(directory / PROTOTYPES_FILE))


def current_name(name: str) -> str:
    """A state-dict name in the layout with `FsgrPmaModel` (`decoder.x` → `model.decoder.x`; current names stay)."""
    for pattern, replacement in KEYS_BEFORE_THE_BASE_MODEL.items():
        name = re.sub(pattern, replacement, name)
    return name


def saved_before_the_base_model(directory: Path) -> bool:
    """Whether the adapter's weights name the captioner's modules `encoder.*` / `decoder.*` (the layout before
    `FsgrPmaModel`), rather than `model.encoder.*` / `model.decoder.*`."""
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as weights:
        return any(key.startswith(("base_model.model.encoder.", "base_model.model.decoder.")) for key in weights.keys())


def load_adapter(base: torch.nn.Module, directory: str | Path) -> PeftModel:
    """Load an adapter written by `scripts/finetune_peft.py` onto `base`, checking it was trained on that base."""
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise ValueError(
            f"{directory} is not a PEFT adapter directory (no adapter_config.json); pass the --output-dir of "
            "scripts/finetune_peft.py"
        )
    info_path = directory / BASE_FILE
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info["base_fingerprint"] != base_fingerprint(base):
            raise ValueError(
                f"The adapter {directory} was trained on another base model ({info['base_model']}); load that "
                "model with AutoModel.from_pretrained and put the adapter on it"
            )
    else:
        logger.warning("%s has no %s: cannot check that it was trained on this base model", directory, BASE_FILE)
    config, key_mapping = PeftConfig.from_pretrained(str(directory)), None
    if saved_before_the_base_model(directory):
        key_mapping = KEYS_BEFORE_THE_BASE_MODEL
        if isinstance(config.target_modules, str):  # a pattern over module names: now under `model.`
            config.target_modules = rf"model\.(?:{config.target_modules})"
    try:
        model = PeftModel.from_pretrained(base, str(directory), config=config, key_mapping=key_mapping)
    except RuntimeError as error:  # shape mismatches from load_state_dict
        first = str(error).strip().splitlines()[0]
        raise ValueError(f"The adapter {directory} does not fit this base model: {first}") from None
    prototypes_path = directory / PROTOTYPES_FILE
    if prototypes_path.is_file():
        prototypes = {current_name(name): tensor for name, tensor in load_file(str(prototypes_path)).items()}
        expected = {name for name in base.state_dict() if is_prototype_buffer(name)}
        missing = expected ^ set(prototypes)
        if missing:
            raise ValueError(f"{prototypes_path} does not match the base model's memory layers ({sorted(missing)[:3]})")
        base.load_state_dict(prototypes, strict=False)
    return model
