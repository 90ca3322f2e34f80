"""How far the prototype memory's cost in decoding is above its floor, at the size users run (issue 23, item 7).

Usage:

    python tools/memory_floor.py --output docs/results/memory_floor_b16.json    # about 5 min on 2 cores

`generate` from the encoder's output (`configuration/model/vit-b16.json`, random weights, prototypes set, the model
as released; 20 new tokens) runs three ways, alternated in one process (A F B, then B F A, ...):

- A, **memory**: the model as it is;
- F, **floor**: the memory attention replaced by the two matmuls that any attention over the prototypes has to run,
  the queries' scores against the 256 prototype keys of each head and a read of the prototype values with weights
  of that shape, beside one SDPA call over the sequence (`floor_attention`: what reading the prototypes costs, not
  an attention; the rest of the memory path, its flag and per-head views, is unchanged);
- B, **no memory**: the same weights with `use_memory=False`.

For each setting (batch, beams) it reports the medians of the per-round ratios A ÷ B, F ÷ B and A ÷ F, each with
its distribution-free 95% confidence interval (order statistics of the rounds' ratios), and the median time of B.
Writes JSON and a markdown table beside it (`.md`).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from modeling_fsgr_pma import modeling_fsgr_pma as fsgr
from tools.benchmark import captioning_from_encoder_output, memory_on_and_off, preset, released

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [(8, 1), (8, 5), (64, 1)]  # (batch, beams): the goal rows' batch, and evaluate_captions.py's default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("outputs/memory_floor_b16.json"), help="JSON written")
    parser.add_argument("--rounds", type=int, default=40, help="rounds of the three runs per setting (40)")
    parser.add_argument("--model-config", type=Path, default=ROOT / "configuration/model/vit-b16.json",
                        help="the config measured (the tests pass a smaller one)")
    return parser.parse_args(argv)


def floor_attention(query, key, value, mask, memory_keys, memory_values, memory_offset, memory_bias, dropout,
                    output_attentions):
    """`attend_with_prototypes`'s signature; runs only its two prototype matmuls and SDPA over the sequence."""
    batch, heads, length, head_dim = query.shape
    rows = query.transpose(0, 1).reshape(heads, batch * length, head_dim)  # (h, B * T, hd)
    (rows @ memory_keys.transpose(-1, -2)) @ memory_values  # (h, B * T, m), then (h, B * T, hd): discarded
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask), None  # (B, h, T, hd)


def median_with_ci(values: list[float]) -> dict:
    """The median and its 95% confidence interval from order statistics (sign-test bounds; the whole range for
    fewer than 6 values)."""
    ordered, n = sorted(values), len(values)
    k = max(0, math.floor((n - 1.96 * math.sqrt(n)) / 2))
    low, high = ordered[k], ordered[n - 1 - k]
    return {"median": round(statistics.median(ordered), 4), "ci95": [round(low, 4), round(high, 4)]}


def measure(on, off, config, batch: int, beams: int, rounds: int) -> dict:
    """The three runs of one setting, `rounds` times in alternating order after one warm-up each."""
    caption = captioning_from_encoder_output(config, batch, beams)

    def floor():
        with mock.patch.object(fsgr, "attend_with_prototypes", floor_attention):
            caption(on)

    runs = {"memory": lambda: caption(on), "floor": floor, "no_memory": lambda: caption(off)}
    times = {name: [] for name in runs}
    for run in runs.values():
        run()
    for index in range(rounds):
        for name in list(runs) if index % 2 == 0 else list(runs)[::-1]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    memory, floor, base = times["memory"], times["floor"], times["no_memory"]
    return {
        "memory_ratio": median_with_ci([a / b for a, b in zip(memory, base)]),
        "floor_ratio": median_with_ci([a / b for a, b in zip(floor, base)]),
        "memory_over_floor": median_with_ci([a / b for a, b in zip(memory, floor)]),
        "no_memory_ms": round(statistics.median(base) * 1e3, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    config = preset(args.model_config)
    on, off = (released(model) for model in memory_on_and_off(config))
    start = time.perf_counter()
    results = {f"batch{batch}_beams{beams}": measure(on, off, config, batch, beams, args.rounds)
               for batch, beams in SETTINGS}
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    report = {"model_config": args.model_config.name, "rounds": args.rounds, "machine": machine,
              "seconds": round(time.perf_counter() - start, 1), "settings": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"`tools/memory_floor.py` ({args.model_config.name}, {args.rounds} rounds, {report['seconds']:.0f} s) on "
             f"{machine}", "", "| batch | beams | memory ÷ none | floor ÷ none | memory ÷ floor | none, ms |",
             "|---|---|---|---|---|---|"]
    for (batch, beams), row in zip(SETTINGS, results.values()):
        cells = [f"{r['median']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
                 for r in (row["memory_ratio"], row["floor_ratio"], row["memory_over_floor"])]
        lines.append(f"| {batch} | {beams} | {' | '.join(cells)} | {row['no_memory_ms']:.0f} |")
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
