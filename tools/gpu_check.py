"""GPU check of the COCO recipe: the vit-b16 preset's training step and captioning on CUDA in bf16, as JSON.

Usage (on a machine with a CUDA GPU; random weights, nothing downloaded):

    python tools/gpu_check.py --output outputs/gpu_check.json

The training step is the recipe's (`configuration/train/coco-vit-b16.yaml`): its per-process batch of images from
cached frozen-prefix features, XE + SupCon with prototype memory on, AdamW, under Accelerate's bf16 autocast. The SCST
step is the recipe's too: beam SCST (`--scst-sequences beam`, its beams per image and length), one encoder pass, the
beams scored with gradient, on a stand-in reward (no references here). The pair-epoch loader (`--xe-epoch pairs`)
runs one epoch over 5 captions of each of 500 images from an in-memory feature cache, through the training collator.
Captioning is the released model's (LoRA merged) from 224-px pixels, beam 5, 20 new tokens. Prints and writes
`train_images_per_s`, `train_tokens_per_s`, `train_peak_memory_gib`, `scst_images_per_s`, `scst_peak_memory_gib`,
`pair_loader_pairs_per_s`, `pair_epoch_complete`, `captions_per_s`, `caption_peak_memory_gib`, the card and the
library versions. `--device cpu --tiny` runs the same code on the CPU with the tiny preset (a
smoke test of the path, not a measurement); `--device cuda` without a GPU exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers
import yaml
from accelerate import Accelerator

from modeling_fsgr_pma import FsgrPmaConfig, FsgrPmaForConditionalGeneration
from modeling_fsgr_pma.data.captions import CaptionPairs
from modeling_fsgr_pma.data.tokenization import train_caption_tokenizer
from modeling_fsgr_pma.training.steps import CaptionCollator, scst_loss

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configuration/train/coco-vit-b16.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset and batch 4 (with --device cpu)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (after 3 warm-up steps)")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; `--device cpu --tiny` runs the same steps on the CPU")
    if args.device == "cuda" and args.tiny:
        parser.error("--tiny is the CPU smoke run; on CUDA the check measures the vit-b16 preset")
    if args.steps < 1:
        parser.error("--steps must be positive")
    return args


def recipe_model(tiny: bool) -> tuple[FsgrPmaForConditionalGeneration, dict]:
    """The recipe's model (random weights, prototypes set so that memory attention runs) and its settings."""
    recipe = yaml.safe_load(RECIPE.read_text())
    preset = ROOT / ("configuration/model/tiny.json" if tiny else recipe["model_config"])
    config = FsgrPmaConfig.from_json_file(preset)
    torch.manual_seed(0)
    model = FsgrPmaForConditionalGeneration(FsgrPmaConfig(**{**config.to_dict(), "vocab_size": recipe["vocab_size"]}))
    for layer in model.memory_layers():
        layer.prototype_keys.normal_()
        layer.prototype_values.normal_()
        layer.prototype_ready.fill_(True)
    settings = {
        "batch_size": 4 if tiny else recipe["batch_size"], "num_beams": recipe["num_beams"],
        "max_new_tokens": recipe["max_new_tokens"], "caption_length": 16,
        "scst_sequences": recipe["scst_sequences"], "scst_num_sequences": recipe["scst_num_sequences"],
    }  # fmt: skip
    return model, settings


def synchronize(accelerator: Accelerator) -> None:
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize(accelerator.device)


def peak_memory_gib(accelerator: Accelerator) -> float | None:
    if accelerator.device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(accelerator.device) / 2**30


def timed_repeats(accelerator: Accelerator, run, warmup: int, repeats: int) -> tuple[float, object]:
    """Run `run()` `warmup` times, reset the peak-memory counter, then time `repeats` more calls (synchronised).
    Returns the seconds and the last call's result."""
    for _ in range(warmup):
        run()
    synchronize(accelerator)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    start = time.perf_counter()
    for _ in range(repeats):
        result = run()
    synchronize(accelerator)
    return time.perf_counter() - start, result


def check_training(accelerator: Accelerator, model, settings: dict, steps: int) -> dict:
    """Images/s and tokens/s of the recipe's training step from cached features, and its peak memory."""
    config, batch = model.config, settings["batch_size"]
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randn(batch, 1 + config.num_patches, config.vision_width, generator=generator).half()
    labels = torch.randint(0, config.num_concepts, (batch, config.num_patches), generator=generator)
    ids = torch.randint(3, config.vocab_size, (batch, settings["caption_length"]), generator=generator)
    ids[:, 0], ids[:, -1] = config.bos_token_id, config.eos_token_id
    inputs = {"vision_hidden_states": prefix.float(), "patch_labels": labels, "input_ids": ids, "labels": ids}
    inputs = {key: value.to(accelerator.device) for key, value in inputs.items()}
    optimizer = torch.optim.AdamW(model.param_groups(0.0, 1e-4))
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    def step() -> None:
        loss = model(**inputs).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, _ = timed_repeats(accelerator, step, 3, steps)  # warm-up: kernels, allocator, the banks' first entries
    return {
        "train_images_per_s": steps * batch / seconds,
        "train_tokens_per_s": steps * batch * (settings["caption_length"] - 1) / seconds,
        "train_peak_memory_gib": peak_memory_gib(accelerator),
        "train_loss_finite": bool(torch.isfinite(model(**inputs).loss).item()),
    }


def check_beam_scst(accelerator: Accelerator, model, settings: dict, steps: int) -> dict:
    """Images/s and peak memory of the recipe's SCST step (beams scored with gradient), on a stand-in reward."""
    unwrapped = accelerator.unwrap_model(model)
    config, batch = unwrapped.config, settings["batch_size"]
    generator = torch.Generator().manual_seed(1)
    prefix = torch.randn(batch, 1 + config.num_patches, config.vision_width, generator=generator)
    inputs = {"row": torch.arange(batch), "vision_hidden_states": prefix.to(accelerator.device)}
    tokenizer = _IdTokenizer()

    def reward(captions: list[str], image_ids: list[str]) -> list[float]:  # prefers short, varied captions
        return [len(set(caption.split())) / (1 + len(caption.split())) for caption in captions]

    def step() -> torch.Tensor:
        with accelerator.autocast():
            loss, _ = scst_loss(model, unwrapped, inputs, tokenizer, [str(i) for i in range(batch)], reward,
                                settings["scst_num_sequences"], settings["max_new_tokens"], settings["scst_sequences"])
        accelerator.backward(loss)
        return loss

    seconds, loss = timed_repeats(accelerator, step, 1, steps)
    model.zero_grad(set_to_none=True)
    return {
        "scst_images_per_s": steps * batch / seconds,
        "scst_peak_memory_gib": peak_memory_gib(accelerator),
        "scst_loss_finite": bool(torch.isfinite(loss).item()),
    }


class _IdTokenizer:
    """Token ids as words: the stand-in reward needs text, not a vocabulary."""

    def batch_decode(self, sequences: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return [" ".join(str(token) for token in row.tolist() if token > 2) for row in sequences]


def check_pair_loader(config: FsgrPmaConfig, settings: dict, images: int = 500) -> dict:
    """One pair epoch (`--xe-epoch pairs`) over 5 captions of each image, from an in-memory feature cache: pairs/s
    through the training collator, and whether every pair came exactly once."""
    from datasets import Dataset

    words = ["a", "red", "blue", "circle", "square", "left", "of", "the", "big", "small"]
    captions = [[f"{words[(i + j) % 10]} {words[(i * 7 + j) % 10]} {i} {j}" for j in range(5)] for i in range(images)]
    ids = [str(i) for i in range(images)]
    data = Dataset.from_dict({"image_id": ids, "captions": captions, "row": list(range(images))})
    tokenizer = train_caption_tokenizer((c for caps in captions for c in caps), 200)
    features = {
        "vision_hidden_states": torch.zeros(images, 1 + config.num_patches, config.vision_width, dtype=torch.float16),
        "patch_labels": torch.zeros(images, config.num_patches, dtype=torch.long),
    }
    collator = CaptionCollator(type("Processor", (), {"tokenizer": tokenizer})(), 24, features=features)
    pairs = CaptionPairs(data)
    loader = torch.utils.data.DataLoader(pairs, batch_size=settings["batch_size"], shuffle=True, collate_fn=collator,
                                         generator=torch.Generator().manual_seed(0))
    seen = []
    start = time.perf_counter()
    for batch in loader:
        for row, tokens in zip(batch["row"], batch["input_ids"]):
            seen.append((int(row), tokenizer.decode(tokens, skip_special_tokens=True)))
    seconds = time.perf_counter() - start
    expected = sorted((i, tokenizer.decode(tokenizer(c)["input_ids"], skip_special_tokens=True))
                      for i, caps in enumerate(captions) for c in caps)
    return {"pair_loader_pairs_per_s": len(seen) / seconds, "pair_epoch_complete": sorted(seen) == expected}


@torch.inference_mode()
def check_captioning(accelerator: Accelerator, model, settings: dict, repeats: int = 3) -> dict:
    """Captions/s of the released model (LoRA merged) with the recipe's beam and length, and its peak memory."""
    model = accelerator.unwrap_model(model)
    model.merge_encoder_lora()
    model.eval()
    config, batch = model.config, settings["batch_size"]
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, device=accelerator.device)
    kwargs = {"num_beams": settings["num_beams"], "max_new_tokens": settings["max_new_tokens"]}

    def caption() -> torch.Tensor:
        with accelerator.autocast():
            return model.generate(pixel_values=pixels, min_new_tokens=settings["max_new_tokens"], **kwargs)

    seconds, sequences = timed_repeats(accelerator, caption, 1, repeats)
    return {
        "captions_per_s": repeats * batch / seconds,
        "caption_peak_memory_gib": peak_memory_gib(accelerator),
        "caption_tokens": int(sequences.shape[1]),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision="bf16", cpu=args.device == "cpu")
    model, settings = recipe_model(args.tiny)
    card = torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else platform.processor()
    result = {
        "device": card or platform.machine(), "preset": "tiny" if args.tiny else "vit-b16",
        "mixed_precision": accelerator.mixed_precision, **settings,
        **check_training(accelerator, model, settings, args.steps),
        **check_beam_scst(accelerator, model, settings, max(1, args.steps // 5)),
        **check_pair_loader(model.config, settings),
        **check_captioning(accelerator, model, settings),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
