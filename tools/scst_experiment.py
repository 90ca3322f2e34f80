"""Paired SCST experiment on the demo's world: XE only against three SCST variants started from the same XE model.

Usage (after `scripts/demo.py`, whose world, CLIP, codebook, feature cache and tokenizer every run shares):

    python tools/scst_experiment.py --demo-dir outputs/demo --seeds 0 1 2 3 4 --output docs/results/scst.json

Per seed, `scripts/train.py` trains XE once (`--xe-steps`, by default the recipe's) and saves a checkpoint; each
variant resumes from that checkpoint into `--scst-steps` of SCST (by default the recipe's), so the variants of a seed
differ only in SCST:

- `off-policy sample`: SCST as it was before on-policy SCST (kept here only, to measure it): samples drawn with the
  model in eval mode, their log-probabilities recomputed in train mode (dropout, fresh Gumbel noise, one encoder
  pass per sequence), transformers' default top-k 50 sampling;
- `sample`: on-policy SCST with 5 samples per image (`--scst-sequences sample`), drawn from the model's own
  distribution;
- `beam`: on-policy SCST with the 5 beams of each image (`--scst-sequences beam`, the papers').

The metric is CIDEr-D on the first `--eval-max-images` validation images at the run's last step (no selection),
captioned with beam 3, as the demo does. Writes `--output` (every run's CIDEr-D, and per variant the mean paired gain
over XE only and over the off-policy variant, with 95% t-intervals) and the table as markdown next to it (`.md`).
Runs whose summaries exist are not repeated.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path
from unittest import mock

import torch
import yaml

from modeling_fsgr_pma.training.steps import image_inputs_of, sequence_log_probs
from scripts import train
from tools.ablations import paired_difference

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"off-policy sample": ["--scst-sequences", "sample"], "sample": ["--scst-sequences", "sample"],
            "beam": ["--scst-sequences", "beam"]}

logger = logging.getLogger(__name__)


def off_policy_scst_loss(model, unwrapped, batch, tokenizer, image_ids, reward_fn, num_samples, max_new_tokens,
                         sequences="sample"):
    """SCST as `scst_loss` computed it before it was made on-policy (for this comparison only)."""
    image_inputs = image_inputs_of(batch)
    unwrapped.eval()
    with torch.no_grad():
        generated = unwrapped.generate(
            encoder_outputs=unwrapped.get_encoder()(**image_inputs), do_sample=True, num_beams=1,
            num_return_sequences=num_samples, max_new_tokens=max_new_tokens,
        )  # (B * S, L), top-k 50 by transformers' default
    unwrapped.train()
    captions = tokenizer.batch_decode(generated, skip_special_tokens=True)
    repeated_ids = [image_id for image_id in image_ids for _ in range(num_samples)]
    rewards = torch.as_tensor(reward_fn(captions, repeated_ids), dtype=torch.float32).view(-1, num_samples)
    advantage = (rewards - rewards.mean(1, keepdim=True)).flatten()  # (B * S,)
    config = unwrapped.config
    is_eos = generated == config.eos_token_id
    mask = (~((is_eos.long().cumsum(1) - is_eos.long()) > 0) & ((generated != config.pad_token_id) | is_eos)).long()
    repeated = {k: v.repeat_interleave(num_samples, 0) for k, v in image_inputs.items()}
    logits = model(**repeated, input_ids=generated, attention_mask=mask).logits  # a second encoder pass, train mode
    return -(advantage * sequence_log_probs(logits, generated, mask)).mean(), rewards.mean().item()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--work-dir", type=Path, default=None, help="runs go here (default: DEMO_DIR/scst)")
    parser.add_argument("--output", type=Path, default=Path("docs/results/scst.json"))
    parser.add_argument("--train-config", type=Path, default=ROOT / "configuration/train/scenes.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--xe-steps", type=int, default=None, help="XE steps (default: the recipe's)")
    parser.add_argument("--scst-steps", type=int, default=None, help="SCST steps (default: the recipe's)")
    parser.add_argument("--eval-max-images", type=int, default=400)
    parser.add_argument("--config-overrides", default=None,
                        help="model config fields for every run, as train.py takes them, e.g. 'memory_prior=true'")
    args = parser.parse_args(argv)
    recipe = yaml.safe_load(args.train_config.read_text())
    args.xe_steps = args.xe_steps if args.xe_steps is not None else recipe["xe_steps"]
    args.scst_steps = args.scst_steps if args.scst_steps is not None else recipe["scst_steps"]
    if len(set(args.seeds)) < 2:
        parser.error("--seeds needs at least two distinct seeds for an interval")
    args.work_dir = args.work_dir or args.demo_dir / "scst"
    return args


def _common(args: argparse.Namespace, seed: int, output: Path) -> list[str]:
    demo = args.demo_dir
    return [
        "--config", str(args.train_config), "--data", str(demo / "data"),
        "--clip-pretrained", str(demo / "clip.safetensors"), "--codebook", str(demo / "codebook.safetensors"),
        "--feature-cache", str(demo / "features"), "--tokenizer", str(demo / "train" / "tokenizer"),
        "--output-dir", str(output), "--seed", str(seed), "--report-to", "none", "--xe-steps", str(args.xe_steps),
        "--eval-max-images", str(args.eval_max_images),
        *(["--config-overrides", args.config_overrides] if args.config_overrides else []),
    ]


def _final_cider(output: Path, step: int) -> float:
    history = json.loads((output / "train_summary.json").read_text())["history"]
    (entry,) = [entry for entry in history if entry["step"] == step]
    return entry["cider"]


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, float]:
    """XE once, then every variant from its last checkpoint; CIDEr-D of each at its last step."""
    base = args.work_dir / f"seed{seed}"
    xe = base / "xe"
    if not (xe / "train_summary.json").is_file():
        train.main(_common(args, seed, xe) + ["--scst-steps", "0", "--eval-every", str(args.xe_steps),
                                               "--checkpoint-every", str(args.xe_steps)])
    results = {"XE only": _final_cider(xe, args.xe_steps)}
    total = args.xe_steps + args.scst_steps
    for name, flags in VARIANTS.items():
        output = base / name.replace(" ", "_")
        if not (output / "train_summary.json").is_file():
            command = _common(args, seed, output) + [
                "--scst-steps", str(args.scst_steps), "--eval-every", str(total), "--checkpoint-every", str(total),
                "--resume-from-checkpoint", str(xe / "checkpoints" / f"step_{args.xe_steps}"), *flags,
            ]
            if name.startswith("off-policy"):
                with mock.patch.object(train, "scst_loss", off_policy_scst_loss):
                    train.main(command)
            else:
                train.main(command)
        results[name] = _final_cider(output, total)
    return results


def summarise(runs: dict[int, dict[str, float]], seeds: list[int]) -> dict:
    names = ["XE only", *VARIANTS]
    column = {name: [runs[seed][name] for seed in seeds] for name in names}
    summary = {}
    for name in names:
        entry = {"mean": statistics.fmean(column[name]), "sd": statistics.stdev(column[name]), "values": column[name]}
        if name != "XE only":
            entry["gain_over_xe"] = paired_difference(column[name], column["XE only"])
        if name not in ("XE only", "off-policy sample"):
            entry["gain_over_off_policy"] = paired_difference(column[name], column["off-policy sample"])
        summary[name] = entry
    return summary


def markdown(summary: dict, args: argparse.Namespace) -> str:
    def interval(d):
        return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"

    lines = [
        f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}); XE {args.xe_steps} steps, "
        f"SCST {args.scst_steps} "
        f"steps from the same XE checkpoint; CIDEr-D on {args.eval_max_images} validation images at the last step.",
        "",
        "| variant | CIDEr-D mean ± sd | gain over XE only [95% CI] | gain over off-policy [95% CI] |",
        "|---|---|---|---|",
    ]
    for name, entry in summary.items():
        gain = interval(entry["gain_over_xe"]) if "gain_over_xe" in entry else "—"
        over = interval(entry["gain_over_off_policy"]) if "gain_over_off_policy" in entry else "—"
        lines.append(f"| {name} | {entry['mean']:.3f} ± {entry['sd']:.3f} | {gain} | {over} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runs = {seed: run_seed(args, seed) for seed in args.seeds}
    summary = summarise(runs, args.seeds)
    report = {"seeds": args.seeds, "xe_steps": args.xe_steps, "scst_steps": args.scst_steps,
              "eval_max_images": args.eval_max_images, "train_config": str(args.train_config.relative_to(ROOT)),
              "runs": {str(seed): result for seed, result in runs.items()}, "summary": summary}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    table = markdown(summary, args)
    args.output.with_suffix(".md").write_text(table)
    print(table)
    return report


if __name__ == "__main__":
    main()
