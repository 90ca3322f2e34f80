"""Train and evaluate the ablations side by side and write the table that README shows.

Usage (after `scripts/demo.py`, whose data, CLIP, codebook and feature cache it reuses):

    python scripts/ablations.py --demo-dir outputs/demo --output outputs/ablations.md

Variants: the full model, `--no-memory`, `--no-fsgr`, `--no-supcon`, and `--num-prototypes` for each value of
`--prototypes`. Each is trained with the same configuration and seed, then scored on `test` and `test_novel`
(CIDEr-D on pycocoevalcap's scale and the hallucination rate); the table also gives each run's seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--output", type=Path, default=Path("outputs/ablations.md"))
    parser.add_argument("--train-config", type=Path, default=ROOT / "configuration/train/synthetic.yaml")
    parser.add_argument("--prototypes", type=int, nargs="*", default=[8, 128], help="extra --num-prototypes runs")
    parser.add_argument("--xe-steps", type=int, default=None, help="override the training config")
    parser.add_argument("--scst-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("data", "clip.pt", "codebook.safetensors", "features", "train/tokenizer"):
        if not (args.demo_dir / name).exists():
            parser.error(f"{args.demo_dir / name} is missing: run scripts/demo.py first")
    return args


def run_script(name: str, argv: list[str]):
    spec = importlib.util.spec_from_file_location(f"fsgr_pma_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    demo = args.demo_dir
    variants = {"full": [], "no memory": ["--no-memory"], "no FSGR": ["--no-fsgr"], "no SupCon": ["--no-supcon"]}
    variants |= {f"{m} prototypes": ["--num-prototypes", m] for m in args.prototypes}
    results = {}
    for name, flags in variants.items():
        output = demo / "ablations" / name.replace(" ", "_")
        train = [
            "--config", args.train_config, "--data", demo / "data", "--clip-pretrained", demo / "clip.pt",
            "--codebook", demo / "codebook.safetensors", "--feature-cache", demo / "features",
            "--tokenizer", demo / "train" / "tokenizer", "--output-dir", output, "--seed", args.seed, *flags,
        ]
        for flag, value in (("--xe-steps", args.xe_steps), ("--scst-steps", args.scst_steps)):
            if value is not None:
                train += [flag, value]
        start = time.perf_counter()
        run_script("train", train)
        seconds = time.perf_counter() - start
        scores = {}
        for split in ("test", "test_novel"):
            metrics = run_script("evaluate", [
                "--model", output / "model", "--data", demo / "data", "--split", split,
                "--output", output / f"metrics_{split}.json",
            ])
            scores[split] = {"CIDEr": metrics["CIDEr"], "hallucination_rate": metrics["hallucination_rate"]}
        results[name] = {**scores, "train_seconds": round(seconds, 1)}
    lines = [
        "| variant | CIDEr test | CIDEr test_novel | hallucination test | hallucination test_novel | train s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['test']['CIDEr']:.3f} | {r['test_novel']['CIDEr']:.3f} | "
            f"{_rate(r['test']['hallucination_rate'])} | {_rate(r['test_novel']['hallucination_rate'])} | "
            f"{r['train_seconds']} |"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    return results


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
