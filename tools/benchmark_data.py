"""Data benchmarks at COCO shape: indexing a JPEG corpus (first and second load) and training from the feature cache.

Usage (docs/benchmarks.md; writes the corpus once, ~1.2 GB for 20,001 Karpathy images at 640×480):

    python tools/benchmark_data.py --corpus outputs/coco-bench --output outputs/benchmark_data.json

Every measurement runs in a fresh child process, so that its peak RSS is its own. Keys (JSON, and a markdown table
next to it):

- `first_load_s_per_1000_images`: `load_caption_split` of Karpathy train (with restval), val and test with an
  empty cache (parse `dataset_coco.json`, decode every JPEG once in `--threads` threads, write the index), seconds
  per 1,000 images; `first_load_images_per_s` the same as a rate.
- `second_load_s`: the same three splits again, cached: seconds in total (goal ≤ 5).
- `first_load_peak_rss_mib`, `second_load_peak_rss_mib`: peak RSS of those processes; `..._small`: the same for a
  `dataset_coco.json` listing the first quarter of the images; `load_peak_rss_ratio`: full ÷ quarter, first load
  (goal: flat, ≤ 1.05).
- `cache_train_peak_rss_ratio`: peak RSS of 20 training steps (tiny preset, batch 32, random rows) from a feature
  cache of `--cache-images` images ÷ from one a quarter of that size (goal ≤ 1.05), with the per-size MiB; the
  caches hold random features of the preset's shape. `cache_train_peak_rss_ratio_eager`: the same with every
  shard read into memory first (what `train.py` did before the cache was memory-mapped), for contrast.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "validation", "test")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path("outputs/coco-bench"), help="made here when missing")
    parser.add_argument("--num-images", type=int, default=16667, help="Karpathy train + restval of a new corpus")
    parser.add_argument("--image-size", type=int, default=480, help="short side of a new corpus's JPEGs")
    parser.add_argument("--threads", type=int, default=None, help="validation threads (default: every CPU)")
    parser.add_argument("--cache-images", type=int, default=40000, help="images of the larger feature cache")
    parser.add_argument("--model-config", type=Path, default=ROOT / "configuration/model/tiny.json")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmark_data.json"))
    parser.add_argument("--probe", choices=["load", "cache-train"], help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--probe-arg", action="append", default=[], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Child processes: each prints one JSON line with its own figures and peak RSS.
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def probe_load(annotations: str, image_root: str, cache_dir: str, threads: int | None) -> dict:
    from modeling_fsgr_pma.data.captions import load_caption_split

    start = time.perf_counter()
    images = sum(
        len(load_caption_split(annotations, split, image_root, cache_dir=cache_dir, num_workers=threads))
        for split in SPLITS
    )
    return {"seconds": time.perf_counter() - start, "images": images, "peak_rss_mib": peak_rss_mib()}


def probe_cache_train(cache_dir: str, model_config: str, eager: str) -> dict:
    import numpy as np
    import torch

    from modeling_fsgr_pma import FsgrPmaConfig, FsgrPmaForConditionalGeneration
    from modeling_fsgr_pma.data.feature_cache import load_feature_cache

    torch.manual_seed(0)
    config = FsgrPmaConfig.from_json_file(model_config)
    model = FsgrPmaForConditionalGeneration(config).train()
    optimizer = torch.optim.AdamW(model.param_groups(0.0, 1e-4), fused=True)
    cache = load_feature_cache(cache_dir, "train")
    columns = cache.aligned(cache.image_ids)
    if eager == "yes":  # every shard in memory, as train.py held the cache before it was memory-mapped
        everything = cache.read(range(len(cache)))
        columns = {"vision_hidden_states": everything[0], "patch_labels": everything[1]}
    rng = np.random.default_rng(0)
    ids = torch.randint(3, config.vocab_size, (32, 16))
    ids[:, 0], ids[:, -1] = config.bos_token_id, config.eos_token_id
    start = time.perf_counter()
    for _ in range(20):
        rows = torch.as_tensor(rng.choice(len(cache), 32, replace=False))
        batch = {"vision_hidden_states": columns["vision_hidden_states"][rows].float(),
                 "patch_labels": columns["patch_labels"][rows]}  # fmt: skip
        model(**batch, input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"seconds": time.perf_counter() - start, "images": len(cache), "peak_rss_mib": peak_rss_mib()}


def run_probe(probe: str, *probe_args: str) -> dict:
    command = [sys.executable, __file__, "--probe", probe, *(f"--probe-arg={arg}" for arg in probe_args)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
def ensure_corpus(args: argparse.Namespace) -> dict:
    """The corpus (generated when `dataset_coco.json` is missing) and a `dataset_coco_quarter.json` of its first
    quarter of images; returns the generation time when it ran."""
    from modeling_fsgr_pma.data.synthetic import generate_coco_world

    timings = {}
    if not (args.corpus / "dataset_coco.json").is_file():
        start = time.perf_counter()
        generate_coco_world(args.corpus, args.num_images, seed=0, image_size=args.image_size)
        timings["corpus_generation_s"] = time.perf_counter() - start
    content = json.loads((args.corpus / "dataset_coco.json").read_text())
    images = content["images"]
    quarter = [image for image in images if image["split"] in ("train", "restval")][: len(images) // 4]
    for split in ("val", "test"):
        quarter += [image for image in images if image["split"] == split][: max(1, len(images) // 80)]
    (args.corpus / "dataset_coco_quarter.json").write_text(json.dumps({**content, "images": quarter}))
    jpegs = sorted(args.corpus.rglob("*.jpg"))
    timings["corpus_jpegs"] = len(jpegs)
    timings["karpathy_images"] = len(images)
    timings["mean_jpeg_kib"] = sum(path.stat().st_size for path in jpegs) / len(jpegs) / 1024
    return timings


def write_random_cache(directory: Path, config_path: Path, count: int) -> None:
    """A feature cache of `count` images with random features of the preset's shape (the reading is measured)."""
    import torch

    from modeling_fsgr_pma import FsgrPmaConfig
    from modeling_fsgr_pma.data.feature_cache import FeatureCacheWriter

    if (directory / "train" / "index.json").is_file():
        return
    config = FsgrPmaConfig.from_json_file(config_path)
    writer = FeatureCacheWriter(directory, "train", [str(i) for i in range(count)], 1024, "float16")
    generator = torch.Generator().manual_seed(0)
    for shard in writer.pending():
        rows = len(writer.rows(shard))
        hidden = torch.randn(rows, 1 + config.num_patches, config.vision_width, generator=generator)
        labels = torch.randint(0, config.num_concepts, (rows, config.num_patches), generator=generator)
        writer.write(shard, hidden, labels)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.probe == "load":
        annotations, image_root, cache_dir, threads = args.probe_arg
        print(json.dumps(probe_load(annotations, image_root, cache_dir, int(threads) or None)))
        return {}
    if args.probe == "cache-train":
        print(json.dumps(probe_cache_train(*args.probe_arg)))
        return {}

    results = ensure_corpus(args)
    threads = str(args.threads or 0)
    index_dir = args.output.parent / "benchmark_data_index"
    for name, annotations in (("", "dataset_coco.json"), ("_small", "dataset_coco_quarter.json")):
        cache = index_dir / f"cache{name}"
        shutil.rmtree(cache, ignore_errors=True)  # the first load starts from an empty cache
        first = run_probe("load", str(args.corpus / annotations), str(args.corpus), str(cache), threads)
        second = run_probe("load", str(args.corpus / annotations), str(args.corpus), str(cache), threads)
        results[f"first_load_images{name}"] = first["images"]
        results[f"first_load_s_per_1000_images{name}"] = 1000 * first["seconds"] / first["images"]
        results[f"second_load_s{name}"] = second["seconds"]
        results[f"first_load_peak_rss_mib{name}"] = first["peak_rss_mib"]
        results[f"second_load_peak_rss_mib{name}"] = second["peak_rss_mib"]
    results["first_load_images_per_s"] = 1000 / results["first_load_s_per_1000_images"]
    results["load_peak_rss_ratio"] = results["first_load_peak_rss_mib"] / results["first_load_peak_rss_mib_small"]
    results["second_load_peak_rss_ratio"] = (
        results["second_load_peak_rss_mib"] / results["second_load_peak_rss_mib_small"]
    )

    for count in (args.cache_images // 4, args.cache_images):
        cache = args.output.parent / f"benchmark_data_cache_{count}"
        write_random_cache(cache, args.model_config, count)
        for eager in ("no", "yes"):
            run = run_probe("cache-train", str(cache), str(args.model_config), eager)
            suffix = "_eager" if eager == "yes" else ""
            results[f"cache_train_peak_rss_mib_{count}{suffix}"] = run["peak_rss_mib"]
    small, large = args.cache_images // 4, args.cache_images
    for suffix in ("", "_eager"):
        results[f"cache_train_peak_rss_ratio{suffix}"] = (
            results[f"cache_train_peak_rss_mib_{large}{suffix}"] / results[f"cache_train_peak_rss_mib_{small}{suffix}"]
        )
    results = {key: round(value, 4) if isinstance(value, float) else value for key, value in results.items()}
    write_report(args.output, results)
    return results


GOALS = {"second_load_s": "≤ 5", "load_peak_rss_ratio": "≤ 1.05 (flat)", "cache_train_peak_rss_ratio": "≤ 1.05"}


def write_report(path: Path, results: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )
    lines = [f"Data benchmark on {machine}", "", "| figure | value | goal |", "|---|---|---|"]
    lines += [f"| `{key}` | {value} | {GOALS.get(key, '')} |" for key, value in results.items()]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
