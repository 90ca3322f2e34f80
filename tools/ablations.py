"""Paired, multi-seed ablations and sweeps: each variant's difference from the full model, with a 95% interval.

Usage (after `scripts/demo.py`, whose world, CLIP, codebook, feature cache and tokenizer every run shares):

    python tools/ablations.py --demo-dir outputs/demo --seeds 0 1 2 3 4 --output outputs/ablations.json
    python tools/ablations.py --demo-dir outputs/demo --seeds 0 1 2 --variants full \
        --sweep num_prototypes=4,8,16,32 --output outputs/sweep_prototypes.json

Variants: `full` (the training config as it is), `no memory`, `log-prior memory` (our extension of PMA-Net's
attention: a learned log-prior on the prototype logits, the prototypes faded in over 100 steps), `no FSGR` (the
decoder reads projected CLIP patches: the interaction layers stay, the language map goes), `no SupCon`, `XE only` (no
SCST steps), and one per value of each `--sweep FIELD=V1,V2` (a model config field, set with `train.py
--config-overrides`, such as `memory_warmup_steps`, or one of train.py's own arguments such as `xe-steps`). Every
variant trains once per seed; for a seed, all variants share the world, the CLIP, the codebook and the tokenizer, and
differ only in what they ablate, so each seed gives one paired difference.

Evaluation runs on a world made once next to the demo's (`DEMO_DIR/ablation-data`): the demo world's own training
images (the same seed and count, so the feature cache serves), and `--test-images` images in each test split. Per
run, on the scene world: CIDEr-D on `test`, `test_novel` and `test_out_domain`, CHAIRi on each, the attribute,
count and relation error rates and the object recall on `test`; on the shape world (`--domain synthetic`): CIDEr-D,
the hallucination rate split into wrong shape / wrong colour / wrong binding, and the teacher-forced cross-entropy
of the `test_novel` references.

Writes `--output` (JSON: every run's metrics, and per variant the mean over seeds and the paired difference from
`full` with its 95% t-interval) and the same tables as markdown next to it (`.md`). Runs whose metric files exist
are not repeated, nor are the runs of an earlier report at `--output` made with the same `--train-args`,
`--test-images` and variant flags, so an interrupted sweep resumes and more seeds or variants extend a report;
`--jobs 2` trains two runs at a time, one thread each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
# Sweepable train.py arguments; any other sweep field is a model config field (`--config-overrides`).
TRAIN_ARGUMENTS = {"xe-steps", "scst-steps", "learning-rate"}
ABLATIONS = {
    "full": [],
    "no memory": ["--config-overrides", "use_memory=false"],
    "no FSGR": ["--config-overrides", "use_fsgr=false"],
    "no SupCon": ["--config-overrides", "supcon_weight=0.0"],
    "log-prior memory": ["--config-overrides", "memory_prior=true,memory_ramp_steps=100"],
    "XE only": ["--scst-steps", "0"],
}
SCENE_METRICS = {  # (split, key in evaluate_captions.py's output, better when)
    **{f"CIDEr {split}": (split, "CIDEr", "higher") for split in ("test", "test_novel", "test_out_domain")},
    **{f"CHAIRi {split}": (split, "chair_i", "lower") for split in ("test", "test_novel", "test_out_domain")},
    "attribute errors test": ("test", "attribute_error_rate", "lower"),
    "count errors test": ("test", "count_error_rate", "lower"),
    "relation errors test": ("test", "relation_error_rate", "lower"),
    "object recall test": ("test", "object_recall", "higher"),
}
SHAPE_METRICS = {
    "CIDEr test": ("test", "CIDEr", "higher"),
    "CIDEr test_novel": ("test_novel", "CIDEr", "higher"),
    "hallucination test": ("test", "hallucination_rate", "lower"),
    "hallucination test_novel": ("test_novel", "hallucination_rate", "lower"),
    "wrong shape test_novel": ("test_novel", "hallucination_wrong_shape", "lower"),
    "wrong colour test_novel": ("test_novel", "hallucination_wrong_colour", "lower"),
    "wrong binding test_novel": ("test_novel", "hallucination_wrong_binding", "lower"),
    "reference CE test_novel": ("test_novel", "reference_cross_entropy", "lower"),
}

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--output", type=Path, default=Path("outputs/ablations.json"))
    parser.add_argument("--train-config", type=Path, default=ROOT / "configuration/train/scenes.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", choices=sorted(ABLATIONS), default=list(ABLATIONS))
    parser.add_argument("--sweep", action="append", default=[], metavar="FIELD=V1,V2",
                        help="one variant per value (repeatable)")
    parser.add_argument("--test-images", type=int, default=1000, help="images in each test split")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets 2 // jobs threads, at least 1)")
    parser.add_argument("--train-args", default="", help="extra train.py arguments for every run, e.g. '--xe-steps 300'")
    args = parser.parse_args(argv)
    for name in ("data/world.json", "clip.safetensors", "codebook.safetensors", "features", "train/tokenizer"):
        if not (args.demo_dir / name).exists():
            parser.error(f"{args.demo_dir / name} is missing: run scripts/demo.py first")
    if "full" not in args.variants:
        parser.error("--variants must include full: every difference is taken against it")
    if len(set(args.seeds)) < 2:
        parser.error("--seeds needs at least two distinct seeds for an interval")
    try:
        args.sweeps = [parse_sweep(spec) for spec in args.sweep]
    except ValueError as error:
        parser.error(str(error))
    return args


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    """`"num_prototypes=4,8"` → `("num_prototypes", ["4", "8"])`."""
    field, _, values = spec.partition("=")
    if not field or not values or "" in values.split(","):
        raise ValueError(f"--sweep {spec!r} must look like FIELD=V1,V2")
    return field, values.split(",")


def variant_flags(args: argparse.Namespace) -> dict[str, list[str]]:
    """train.py flags of every variant; a sweep value is a train.py argument when it is one, else a config field."""
    variants = {name: ABLATIONS[name] for name in args.variants}
    for field, values in args.sweeps:
        for value in values:
            if field.replace("_", "-") in TRAIN_ARGUMENTS:
                variants[f"{field}={value}"] = [f"--{field.replace('_', '-')}", value]
            else:
                variants[f"{field}={value}"] = ["--config-overrides", f"{field}={value}"]
    return variants


def ablation_world(demo_dir: Path, test_images: int) -> Path:
    """The demo's training world with `test_images` images in each test split (made once, then reused)."""
    from modeling_fsgr_pma.data import scenes, synthetic

    world = json.loads((demo_dir / "data" / "world.json").read_text())
    target = demo_dir / "ablation-data"
    made = target / "world.json"
    if made.is_file() and json.loads(made.read_text())["counts"]["test"] == test_images:
        return target
    train = world["counts"]["train"]
    fractions = {"validation": world["counts"]["validation"] / train} | {
        split: test_images / train for split in world["counts"] if split.startswith("test")}
    if world["domain"] == scenes.DOMAIN:
        scenes.generate_world(target, train, world["seed"], world["image_size"], fractions)
    else:
        synthetic.generate_world(target, train, world["seed"], world["image_size"], world["domain"], fractions)
    return target


def metrics_of(world: Path) -> dict[str, tuple[str, str, str]]:
    """The metrics reported for a world: the scene world's or the shape world's."""
    return SCENE_METRICS if json.loads((world / "world.json").read_text())["domain"] == "scenes" else SHAPE_METRICS


def recorded_runs(args: argparse.Namespace, variants: dict[str, list[str]]) -> dict[tuple[str, int], dict]:
    """The runs of the report already at `--output`, where it was made with the same training arguments, test
    images and variant flags: `(variant, seed)` → metrics by split. A report is a record; its runs are not
    repeated."""
    if not args.output.is_file():
        return {}
    report = json.loads(args.output.read_text())
    if (report["train_args"], report["test_images"]) != (args.train_args, args.test_images):
        return {}
    return {
        (name, int(seed)): metrics
        for name, by_seed in report["runs"].items() if report["variants"].get(name) == variants.get(name)
        for seed, metrics in by_seed.items()
    }


def run_variant(args: argparse.Namespace, world: Path, name: str, flags: list[str], seed: int) -> dict:
    """Train one variant with one seed and evaluate it on the test splits (skipped when already done)."""
    demo, output = args.demo_dir, args.demo_dir / "ablations" / f"seed{seed}" / name.replace(" ", "_")
    splits = sorted({split for split, _, _ in metrics_of(world).values()})
    metrics = {split: output / f"metrics_{split}.json" for split in splits}
    if (name, seed) in args.recorded:
        return args.recorded[name, seed]
    if all(path.is_file() for path in metrics.values()):
        return {split: json.loads(path.read_text()) for split, path in metrics.items()}
    threads = str(max(1, 2 // args.jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    train = [
        sys.executable, str(SCRIPTS / "train.py"), "--config", str(args.train_config), "--data", str(demo / "data"),
        "--clip-pretrained", str(demo / "clip.safetensors"), "--codebook", str(demo / "codebook.safetensors"),
        "--feature-cache", str(demo / "features"), "--tokenizer", str(demo / "train" / "tokenizer"),
        "--output-dir", str(output), "--seed", str(seed), "--report-to", "none", *args.train_args.split(), *flags,
    ]
    logger.info("training %s, seed %d", name, seed)
    _run(train, env, output / "train.log")
    for split, path in metrics.items():
        _run([sys.executable, str(SCRIPTS / "evaluate_captions.py"), "--model", str(output / "model"), "--data", str(world),
              "--split", split, "--output", str(path)], env, output / f"evaluate_{split}.log")
    return {split: json.loads(path.read_text()) for split, path in metrics.items()}


def _run(command: list[str], env: dict, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        done = subprocess.run(command, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[1:3])} failed with exit status {done.returncode}; see {log}")


def paired_difference(values: list[float], against: list[float]) -> dict[str, float]:
    """Mean of the paired differences `values - against` over seeds, with its 95% t-interval (`low`, `high`)."""
    differences = [v - a for v, a in zip(values, against)]
    mean = statistics.fmean(differences)
    seeds = len(differences)
    half_width = float(stats.t.ppf(0.975, seeds - 1)) * statistics.stdev(differences) / seeds**0.5
    return {"mean": mean, "low": mean - half_width, "high": mean + half_width}


def paired_summary(runs: dict[str, dict[int, dict]], seeds: list[int], metrics: dict) -> dict:
    """Per variant and metric: the mean over seeds and, against `full`, the mean paired difference ± a 95% t-interval."""
    summary = {}
    for name, by_seed in runs.items():
        summary[name] = {}
        for metric, (split, key, better) in metrics.items():
            values = [by_seed[seed][split][key] for seed in seeds]
            if None in values or (name != "full" and None in [runs["full"][seed][split][key] for seed in seeds]):
                summary[name][metric] = None  # undefined in some run (a relation error rate with no relation said)
                continue
            entry = {"mean": statistics.fmean(values), "sd": statistics.stdev(values), "values": values}
            if name != "full":
                difference = paired_difference(values, [runs["full"][seed][split][key] for seed in seeds])
                entry["difference"] = difference
                entry["full_better"] = difference["high"] < 0 if better == "higher" else difference["low"] > 0
            summary[name][metric] = entry
    return summary


def markdown(summary: dict, seeds: list[int]) -> str:
    """Two tables: means over seeds, and each variant minus full with its 95% interval."""
    names = list(summary["full"])
    means = ["| variant | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    differences = ["| variant − full | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for variant, metrics in summary.items():
        means.append(f"| {variant} | " + " | ".join(
            f"{metrics[m]['mean']:.3f} ± {metrics[m]['sd']:.3f}" if metrics[m] else "n/a" for m in names) + " |")
        if variant != "full":
            cells = []
            for m in names:
                d = metrics[m]["difference"] if metrics[m] else None
                cells.append(f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "n/a")
            differences.append(f"| {variant} | " + " | ".join(cells) + " |")
    header = f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); mean ± standard deviation over seeds.\n\n"
    note = "\n\nPaired differences (variant − full), mean [95% t-interval] over seeds.\n\n"
    return header + "\n".join(means) + note + "\n".join(differences) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    world = ablation_world(args.demo_dir, args.test_images)
    variants = variant_flags(args)
    args.recorded = recorded_runs(args, variants)
    jobs = [(name, flags, seed) for seed in args.seeds for name, flags in variants.items()]

    def run_or_failure(job: tuple[str, list[str], int]) -> dict | RuntimeError:
        try:
            return run_variant(args, world, *job)
        except RuntimeError as error:  # one failed run does not cancel the rest of a long sweep
            return error

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_or_failure, jobs))
    failures = [str(result) for result in results if isinstance(result, RuntimeError)]
    if failures:
        raise SystemExit(f"{len(failures)} of {len(jobs)} runs failed (the finished ones are kept and reused by the "
                         "same command):\n" + "\n".join(failures))
    metrics = metrics_of(world)
    runs: dict[str, dict[int, dict]] = {}
    for (name, _, seed), result in zip(jobs, results):
        runs.setdefault(name, {})[seed] = {
            split: {key: values[key] for split_, key, _ in metrics.values() if split_ == split}
            for split, values in result.items()
        }
    summary = paired_summary(runs, args.seeds, metrics)
    report = {"seeds": args.seeds, "test_images": args.test_images, "train_args": args.train_args,
              "variants": {name: flags for name, flags in variants.items()}, "runs": runs, "summary": summary}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    table = markdown(summary, args.seeds)
    args.output.with_suffix(".md").write_text(table)
    print(table)
    return report


if __name__ == "__main__":
    main()
