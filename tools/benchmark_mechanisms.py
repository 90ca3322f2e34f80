"""What each speed mechanism of `modeling_fsgr_pma.py` buys at the size users run (issue 23, item 3).

Usage:

    python tools/benchmark_mechanisms.py --output docs/results/mechanisms_b16.json

The model is `configuration/model/vit-b16.json` (ViT-B/16 tower with FSGR's deep prompts, LoRA merged as released, 3
decoder layers of width 512, 256 prototypes, random weights, prototypes set). For each mechanism, the part of a
captioning call it belongs to (the encoder from pixels, or `generate` from the encoder's output) runs with it (A, the
code as it is) and without it (B, the mechanism patched out in this process: the simplest equivalent code),
alternated A B A B, median of `--repeats`, at batch 1 and 32, greedy and beam 5, 20 new tokens. The median time of
the other part is added to both sides: `gain` = (B - A) / (A + rest), the share of a whole captioning call that the
mechanism saves.
Writes JSON and a markdown table beside it (`.md`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
import transformers
from transformers import GenerationMixin

from modeling_fsgr_pma import modeling_fsgr_pma as fsgr
from tools.benchmark import model_with_prototypes, preset, released

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [(1, 1), (1, 5), (32, 1), (32, 5)]  # (batch, beams)


def full_sequence_blocks(tower, x: torch.Tensor, with_prompts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """FSGR's `forward_deep_prompt`: every block over `[cls; patches; prompts]`, the prompts' outputs dropped."""
    last_input = x
    for prompts, block in zip(tower.prompts, tower.blocks[tower.first_adapted_block :]):
        last_input = x
        prompt = tower.prompt_proj(prompts.to(x.dtype)).expand(len(x), -1, -1)  # (B, P, d_v)
        x = block(torch.cat([x, prompt], dim=1))[:, : x.shape[1]]
    return tower.prompt_norm(x), last_input


PROMPT_KEYS_VALUES = fsgr.FsgrPmaVisionTower.prompt_keys_values  # the method as the model has it


def prompt_keys_values_every_call(tower, dtype: torch.dtype) -> list[torch.Tensor]:
    tower._prompt_kv = None  # nothing to reuse
    return PROMPT_KEYS_VALUES(tower, dtype)


# name → (what it is, the part of a call it speeds up, a context manager that patches it out). The mechanisms
# measured below 3% were removed after the run in docs/benchmarks-mechanisms.md; their entries are in this file at
# commit 57b9789.
MECHANISMS = {
    "shared_cross_attention_rows": (
        "one cross-attention key/value row per image shared by its beams (`FsgrPmaCache.rows_per_image`, set by "
        "the `_expand_inputs_for_generation` override; B: one row per sequence, reordered at every beam step)",
        "decoder",
        lambda: mock.patch.object(
            fsgr.FsgrPmaForConditionalGeneration, "_expand_inputs_for_generation",
            GenerationMixin._expand_inputs_for_generation,
        ),
    ),
    "prompts_as_keys_only": (
        "deep prompts enter each block as keys and values only (`prompted_block`; B: the block runs over "
        "`[cls; patches; prompts]` and the prompts' outputs are dropped, as FSGR's code does)",
        "encoder",
        lambda: mock.patch.object(fsgr.FsgrPmaVisionTower, "adapted_blocks", full_sequence_blocks),
    ),
    "prompt_kv_reuse": (
        "inference reuses the deep prompts' keys and values while their weights are unchanged "
        "(`prompt_keys_values`; B: made on every call, once per batch)",
        "encoder",
        lambda: mock.patch.object(fsgr.FsgrPmaVisionTower, "prompt_keys_values", prompt_keys_values_every_call),
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("outputs/mechanisms_b16.json"))
    parser.add_argument("--model-config", type=Path, default=ROOT / "configuration/model/vit-b16.json")
    parser.add_argument("--repeats", type=int, default=3, help="timed A/B pairs per figure")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--mechanisms", nargs="*", choices=list(MECHANISMS), default=list(MECHANISMS))
    return parser.parse_args(argv)


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    config = preset(args.model_config)
    model = released(model_with_prototypes(config))
    model_config = args.model_config.resolve()
    model_config = model_config.relative_to(ROOT) if model_config.is_relative_to(ROOT) else model_config
    results = {"model_config": str(model_config), "repeats": args.repeats, "rows": []}
    with torch.inference_mode():
        for batch, beams in SETTINGS:
            pixel_values = torch.randn(batch, 3, config.image_size, config.image_size)
            encoder = model.get_encoder()

            def encode():
                return encoder(pixel_values=pixel_values)

            encoder_outputs = encode()  # also the warm-up

            def caption():
                model.generate(
                    encoder_outputs=fsgr.FsgrPmaEncoderOutput(**encoder_outputs), num_beams=beams, do_sample=False,
                    max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                )

            caption()  # warm-up
            part_s = {"encoder": statistics.median(timed(encode) for _ in range(2)),
                      "decoder": statistics.median(timed(caption) for _ in range(2))}
            for name in args.mechanisms:
                _, part, without = MECHANISMS[name]
                run = encode if part == "encoder" else caption
                runs = {"A": run, "B": lambda: _patched(without, run)}
                runs["A"](), runs["B"]()  # warm-up
                times = {"A": [], "B": []}
                for _ in range(args.repeats):
                    for side in ("A", "B"):
                        times[side].append(timed(runs[side]))
                a, b = statistics.median(times["A"]), statistics.median(times["B"])
                rest_s = part_s["decoder" if part == "encoder" else "encoder"]  # the part the mechanism leaves alone
                row = {"mechanism": name, "part": part, "batch": batch, "beams": beams, "rest_s": rest_s,
                       "with_s": a, "without_s": b, "gain": (b - a) / (a + rest_s)}
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
    results["machine"] = {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "transformers": transformers.__version__}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    write_table(args.output.with_suffix(".md"), results)
    return results


def _patched(patch: contextlib.AbstractContextManager, run) -> None:
    with patch():
        run()


def write_table(path: Path, results: dict) -> None:
    lines = ["| mechanism | part | batch | beams | rest of the call s | with s | without s | gain (share of a call) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in results["rows"]:
        lines.append(f"| {row['mechanism']} | {row['part']} | {row['batch']} | {row['beams']} | {row['rest_s']:.3f} | "
                     f"{row['with_s']:.3f} | {row['without_s']:.3f} | {100 * row['gain']:+.1f}% |")
    machine = results["machine"]
    lines.append("")
    lines.append(f"{results['model_config']}, median of {results['repeats']} alternated pairs; {machine['platform']}, "
                 f"{machine['threads']} threads, torch {machine['torch']}, transformers {machine['transformers']}.")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
