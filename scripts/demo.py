"""The README's main job: the whole pipeline on the bundled scene world, on a CPU, in minutes.

Usage:

    python scripts/demo.py [--output-dir outputs/demo] [--num-images 4000] [--seed 0]

Steps: generate the scene world (`scripts/make_synthetic.py`, docs/synthetic-world.md) → take the shipped tiny
CLIP (`weights/clip-tiny-scenes.safetensors`, made by `tools/pretrain_clip.py`; its docstring has the command) →
build the concept codebook → cache the frozen-prefix features → train (XE + SupCon with prototype memory, then
SCST) → evaluate on `test`, `test_novel` (held-out combinations) and `test_out_domain` (categories never in the
captioning data) → probe what the vision side sees (`tools/probe_vision.py`) → caption a few images with
`AutoModel`/`AutoProcessor`. Results land in `--output-dir`: `model/` (with its model card, `README.md`, which
says what it was trained on and carries the test metrics), `metrics_{test,test_novel,test_out_domain}.json`,
`probe_vision.json`, `timings.json`, `data/`, `samples/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

# The pipeline's steps, imported as the sibling modules they are when this file runs as `python scripts/demo.py`.
import build_codebook
import evaluate_captions
import extract_features
import make_synthetic
import push_to_hub
import train

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("fsgr_pma.demo")
METRICS = ["Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "chair_i", "chair_s", "object_recall"]
SPLITS = ("test", "test_novel", "test_out_domain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--num-images", type=int, default=4000, help="training images of the scene world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-config", type=Path, default=ROOT / "configuration/train/scenes.yaml")
    parser.add_argument("--model-config", type=Path, default=ROOT / "configuration/model/tiny-scenes.json")
    parser.add_argument("--xe-steps", type=int, default=None, help="override the training config (quick runs)")
    parser.add_argument("--scst-steps", type=int, default=None)
    parser.add_argument("--clip", type=Path, default=ROOT / "weights/clip-tiny-scenes.safetensors",
                        help="the pre-trained tiny CLIP (tools/pretrain_clip.py)")
    return parser.parse_args(argv)


def run_tool(name: str, argv: list) -> None:
    """Run `tools/NAME.py` as its own process (the lab tools are not importable from here)."""
    command = [sys.executable, str(ROOT / "tools" / f"{name}.py"), *map(str, argv)]
    logger.info("running %s", shlex.join(command))
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    out = args.output_dir
    data, clip, codebook, features = out / "data", out / "clip.safetensors", out / "codebook.safetensors", out / "features"
    timings = {}

    def timed(step: str, run, step_args: list):
        start = time.perf_counter()
        result = run([str(a) for a in step_args])
        timings[step] = round(time.perf_counter() - start, 1)
        return result

    timed("data", make_synthetic.main, [
        "--output-dir", data, "--num-images", args.num_images, "--seed", args.seed,
    ])
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.clip, clip)  # the demo directory holds everything the ablations and the probes reuse
    vocabulary = ROOT / "configuration/concepts/scenes.txt"
    timed("codebook", build_codebook.main, [
        "--model-config", args.model_config, "--clip-pretrained", clip, "--vocabulary", vocabulary, "--output", codebook,
        "--templates", "{}",  # concept names are phrases the tiny CLIP's text tower was trained on
    ])
    timed("features", extract_features.main, [
        "--model-config", args.model_config, "--clip-pretrained", clip, "--codebook", codebook, "--data", data,
        "--splits", "train", "validation", "--output-dir", features,
    ])
    train_args = [
        "--config", args.train_config, "--model-config", args.model_config, "--data", data,
        "--clip-pretrained", clip, "--codebook", codebook, "--feature-cache", features,
        "--output-dir", out / "train", "--seed", args.seed,
    ]
    for flag, value in (("--xe-steps", args.xe_steps), ("--scst-steps", args.scst_steps)):
        if value is not None:
            train_args += [flag, value]
    timed("train", train.main, train_args)
    model_dir = out / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.move(out / "train" / "model", model_dir)

    results = {}
    for split in SPLITS:
        results[split] = timed(f"evaluate_{split}", evaluate_captions.main, [
            "--model", model_dir, "--data", data, "--split", split, "--output", out / f"metrics_{split}.json",
        ])
    write_model_card(model_dir, [out / f"metrics_{split}.json" for split in results])
    timed("probe_vision", lambda argv: run_tool("probe_vision", argv), [
        "--model", model_dir, "--clip-pretrained", clip, "--data", data, "--output", out / "probe_vision.json",
    ])
    samples = caption_samples(model_dir, data, out / "samples")
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    print_report(results, samples, timings)
    return results


def write_model_card(model_dir: Path, metric_files: list[Path]) -> None:
    """`model_dir/README.md`: the card `scripts/push_to_hub.py` would publish (the CLI and the app read it)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    args = push_to_hub.parse_args(["--model", str(model_dir), "--repo-id", "USER/fsgr-pma-scenes",
                                   "--metrics", *map(str, metric_files)])
    push_to_hub.build_card(model, args).save(model_dir / "README.md")


def caption_samples(model_dir: Path, data: Path, samples_dir: Path, count: int = 4) -> list[tuple[str, str, str]]:
    """Caption a few test images with the plain `AutoModel`/`AutoProcessor` path a user would take."""
    import torch
    from transformers import AutoModel, AutoProcessor

    from modeling_fsgr_pma.data.captions import load_caption_split

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    rows = load_caption_split(data, "test_novel").select(range(count))
    samples_dir.mkdir(parents=True, exist_ok=True)
    images = list(rows["image"])
    with torch.inference_mode():
        ids = model.generate(**processor(images=images, return_tensors="pt"))
    captions = processor.batch_decode(ids, skip_special_tokens=True)
    samples = []
    for row, image, caption in zip(rows, images, captions):
        path = samples_dir / f"{row['image_id']}.png"
        image.save(path)
        samples.append((str(path), caption.strip(), row["captions"][0]))
    return samples


def print_report(results: dict, samples: list, timings: dict) -> None:
    header = "| split | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 1)]
    for split, result in results.items():
        cells = [f"{result[m]:.3f}" if isinstance(result.get(m), float) else "skipped" for m in METRICS]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"{path}: {caption!r}   (a reference: {reference!r})" for path, caption, reference in samples]
    lines.append("")
    lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
