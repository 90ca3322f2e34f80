"""tools/benchmark.py's two modes run on a tiny config and write every figure with its goal (pass/fail); the parts of
tools/benchmark_data.py run on a tiny corpus; tools/memory_floor.py's floor is the model without memory plus the
prototype matmuls."""

from __future__ import annotations

import json
import math
from unittest import mock

import pytest
import torch

from modeling_fsgr_pma import modeling_fsgr_pma as fsgr
from tools import benchmark, benchmark_data, benchmark_mechanisms, memory_floor
from conftest import random_batch, tiny_config

TINY_KEYS = {
    "memory_macs_ratio_tiny", "train_step_memory_ratio_tiny", "generate_memory_ratio_greedy_tiny",
    "generate_memory_ratio_beam5_tiny", "refresh_share", "kmeans_faiss_s", "kmeans_torch_s",
    "generate_vs_ved_ratio_tiny_b1", "generate_vs_ved_ratio_tiny_b32", "feature_cache_speedup", "feature_cache_bound",
    "feature_cache_efficiency", "peak_rss_memory_ratio", "tower_vs_vit_time_ratio_b32", "encoder_share_tower_b32",
    "encoder_share_dense_b32", "encoder_share_quantize_b32", "encoder_share_interaction_b32",
}
B16_GOALS = {
    "train_step_memory_ratio_b16", "generate_memory_ratio_greedy_b16", "generate_memory_ratio_beam5_b16",
    "generate_vs_ved_ratio_b16_b1", "generate_vs_ved_ratio_b16_b32", "train_step_flops_utilisation_b16",
    "feature_cache_efficiency_b16",
}


def _run(tmp_path, preset: str) -> dict:
    config = tiny_config(vocab_size=64, max_position_embeddings=24, memory_window=4)
    config.to_json_file(tmp_path / "model.json")
    output = tmp_path / f"{preset}.json"
    argv = ["--preset", preset, "--repeats", "1", "--model-config", str(tmp_path / "model.json"), "--output", str(output)]
    figures = benchmark.main(argv)
    report = json.loads(output.read_text())
    assert report["figures"] == figures and report["preset"] == preset
    return report


def test_tiny_mode_writes_every_guard_and_diagnostic(tmp_path):
    report = _run(tmp_path, "tiny")
    figures, goals = report["figures"], report["goals"]
    assert TINY_KEYS <= set(figures)
    assert all(isinstance(figures[k], float) and figures[k] > 0 for k in TINY_KEYS)
    shares = [figures[f"encoder_share_{part}_b32"] for part in ("tower", "dense", "quantize", "interaction")]
    assert sum(shares) == pytest.approx(1.0, abs=1e-3)
    guards = {"train_step_memory_ratio_tiny", "generate_memory_ratio_greedy_tiny", "generate_memory_ratio_beam5_tiny"}
    assert guards <= set(goals) and all(goals[k]["goal"] == "≤ 1.15" for k in guards)
    assert not any(key.endswith("_b16") for key in figures)


def test_b16_mode_measures_only_the_goal_rows_each_with_its_verdict(tmp_path):
    report = _run(tmp_path, "vit-b16")
    figures, goals = report["figures"], report["goals"]
    assert set(goals) == B16_GOALS and "memory_macs_ratio_b16" in figures
    assert all(math.isfinite(figures[k]) and figures[k] > 0 for k in figures)
    bound = round(figures["memory_macs_ratio_b16"] + 0.03, 4)
    assert goals["train_step_memory_ratio_b16"]["bound"] == bound
    assert goals["train_step_memory_ratio_b16"]["holds"] == (figures["train_step_memory_ratio_b16"] <= bound)
    assert goals["generate_vs_ved_ratio_b16_b32"]["holds"] == (figures["generate_vs_ved_ratio_b16_b32"] >= 1.10)
    table = (tmp_path / "vit-b16.md").read_text()
    for key, goal in goals.items():
        row = next(line for line in table.splitlines() if f"`{key}`" in line)
        assert row.endswith("| pass |" if goal["holds"] else "| **fail** |")
    assert "memory_macs_ratio_b16` + 0.03 =" in table and "≥ 0.7" in table


def test_goals_compare_against_bounds_and_reference_rows():
    results = {"memory_macs_ratio_b16": 1.02, "train_step_memory_ratio_b16": 1.06, "generate_vs_ved_ratio_b16_b1": 1.1}
    goals = benchmark.check_goals(results)
    assert set(goals) == {"train_step_memory_ratio_b16", "generate_vs_ved_ratio_b16_b1"}
    assert goals["train_step_memory_ratio_b16"] == {"goal": "≤ `memory_macs_ratio_b16` + 0.03", "bound": 1.05, "holds": False}
    assert goals["generate_vs_ved_ratio_b16_b1"]["holds"]


def test_median_of_ratios_is_the_median_of_paired_runs():
    runs = iter([(1.3, 1.0), (1.0, 1.0), (2.2, 2.0)])
    assert benchmark.median_of_ratios(lambda: next(runs)) == pytest.approx(1.1)


def test_flops_utilisation_counts_the_decoders_step_and_the_machines_rate():
    config = tiny_config(num_prototypes=8, memory_window=8)
    flops = benchmark.decoder_step_flops(config, batch=2, length=5, memory=False)
    assert benchmark.decoder_step_flops(config, batch=4, length=5, memory=False) == pytest.approx(2 * flops)
    d, m, layers = config.hidden_size, config.num_prototypes, config.num_hidden_layers
    memory = benchmark.decoder_step_flops(config, batch=2, length=5, memory=True) - flops
    assert memory == pytest.approx(3 * 2 * 2 * 5 * layers * 2 * m * d)  # 3 x fwd, 2 FLOPs per MAC, B T L 2md
    result = benchmark.bench_flops_utilisation(config, repeats=1, batch=2, length=5)
    assert set(result) == {"matmul_gflops", "train_step_flops_utilisation_b16", "train_step_flops_utilisation_b16_ved"}
    assert all(0 < value for value in result.values())
    assert result["train_step_flops_utilisation_b16"] < 1.5  # the tiny step cannot outrun a large matmul by much


def test_memory_macs_ratio_grows_linearly_with_the_prototypes():
    config = tiny_config(num_prototypes=8, memory_window=8)
    ratio = benchmark.memory_macs_ratio(config)
    doubled = benchmark.memory_macs_ratio(tiny_config(num_prototypes=16, memory_window=8))
    assert ratio > 1 and doubled - 1 == pytest.approx(2 * (ratio - 1))


def test_data_benchmark_probes_measure_loading_and_training_from_the_cache(tmp_path):
    """tools/benchmark_data.py's parts on a tiny corpus (its full run writes 20,001 JPEGs: a script, not a test)."""
    benchmark = benchmark_data
    args = benchmark.parse_args(["--corpus", str(tmp_path / "coco"), "--num-images", "8", "--image-size", "32"])
    corpus = benchmark.ensure_corpus(args)
    assert corpus["karpathy_images"] == 12 and corpus["corpus_jpegs"] == 18 and corpus["corpus_generation_s"] > 0
    quarter = json.loads((tmp_path / "coco" / "dataset_coco_quarter.json").read_text())["images"]
    assert [image["split"] for image in quarter] == ["train", "train", "train", "val", "test"]
    first = benchmark.probe_load(str(tmp_path / "coco" / "dataset_coco.json"), str(tmp_path / "coco"),
                                 str(tmp_path / "index"), threads=2)  # fmt: skip
    assert first["images"] == 12 and first["seconds"] > 0 and first["peak_rss_mib"] > 0
    config = tiny_config(vocab_size=64, max_position_embeddings=24)
    config.to_json_file(tmp_path / "model.json")
    benchmark.write_random_cache(tmp_path / "cache", tmp_path / "model.json", 40)
    for eager in ("no", "yes"):
        run = benchmark.probe_cache_train(str(tmp_path / "cache"), str(tmp_path / "model.json"), eager)
        assert run["images"] == 40 and run["peak_rss_mib"] > 0


def test_mechanisms_benchmark_times_each_mechanism_in_its_part_of_a_call(tmp_path):
    config = tiny_config(vocab_size=64, max_position_embeddings=24, memory_window=4, num_prompt_tokens=2)
    config.to_json_file(tmp_path / "model.json")
    output = tmp_path / "mechanisms.json"
    argv = ["--repeats", "1", "--max-new-tokens", "3", "--model-config", str(tmp_path / "model.json"),
            "--output", str(output)]
    results = benchmark_mechanisms.main(argv)
    assert json.loads(output.read_text()) == results
    parts = {(row["mechanism"], row["part"]) for row in results["rows"]}
    assert parts == {(name, part) for name, (_, part, _) in benchmark_mechanisms.MECHANISMS.items()}
    assert len(results["rows"]) == 4 * len(parts)
    assert all(row["with_s"] > 0 < row["without_s"] for row in results["rows"])
    assert "prompts_as_keys_only | encoder" in output.with_suffix(".md").read_text()


@pytest.mark.parametrize("name", list(benchmark_mechanisms.MECHANISMS))
def test_each_mechanism_patched_out_captions_the_same(name):
    """The benchmark's B side (the mechanism patched out) is the same computation: the same tokens, the same scores."""
    config = tiny_config(vocab_size=64, max_position_embeddings=24, memory_window=4, num_prompt_tokens=2, dropout=0.0)
    model = benchmark.released(benchmark.model_with_prototypes(config))
    pixel_values, _ = random_batch(config)
    kwargs = {"num_beams": 3, "max_new_tokens": 4, "output_scores": True, "return_dict_in_generate": True}
    with torch.inference_mode():
        with_it = model.generate(pixel_values=pixel_values, **kwargs)
        with benchmark_mechanisms.MECHANISMS[name][2]():
            without = model.generate(pixel_values=pixel_values, **kwargs)
    torch.testing.assert_close(without.sequences, with_it.sequences)
    torch.testing.assert_close(without.sequences_scores, with_it.sequences_scores)


def test_memory_floor_times_the_memory_its_floor_and_no_memory_in_each_setting(tmp_path):
    config = tiny_config(vocab_size=64, max_position_embeddings=24, memory_window=4)
    config.to_json_file(tmp_path / "model.json")
    output = tmp_path / "floor.json"
    argv = ["--rounds", "2", "--model-config", str(tmp_path / "model.json"), "--output", str(output)]
    results = memory_floor.main(argv)
    assert json.loads(output.read_text())["settings"] == results
    assert set(results) == {f"batch{batch}_beams{beams}" for batch, beams in memory_floor.SETTINGS}
    for row in results.values():
        for ratio in (row["memory_ratio"], row["floor_ratio"], row["memory_over_floor"]):
            assert 0 < ratio["ci95"][0] <= ratio["median"] <= ratio["ci95"][1]
        assert row["no_memory_ms"] > 0
    assert len(output.with_suffix(".md").read_text().splitlines()) == 4 + len(memory_floor.SETTINGS)


def test_memory_floor_attention_leaves_the_model_without_memory():
    """Apart from the two prototype matmuls, whose results it drops, the floor computes what the model without
    memory does: the same logits from the same weights, where the memory itself changes them."""
    config = tiny_config(vocab_size=64, max_position_embeddings=24, memory_window=4, dropout=0.0)
    on, off = (model.eval() for model in benchmark.memory_on_and_off(config))
    pixel_values, input_ids = random_batch(config)
    with torch.inference_mode():
        without = off(pixel_values=pixel_values, input_ids=input_ids).logits
        with_memory = on(pixel_values=pixel_values, input_ids=input_ids).logits
        with mock.patch.object(fsgr, "attend_with_prototypes", memory_floor.floor_attention):
            floor = on(pixel_values=pixel_values, input_ids=input_ids).logits
    torch.testing.assert_close(floor, without)
    assert not torch.allclose(with_memory, without, atol=1e-3)


def test_memory_floor_confidence_interval_is_the_sign_test_order_statistics():
    values = [float(v) for v in range(1, 41)]  # 40 rounds: k = floor((40 - 1.96 * sqrt(40)) / 2) = 13
    assert memory_floor.median_with_ci(values) == {"median": 20.5, "ci95": [14.0, 27.0]}
    assert memory_floor.median_with_ci([3.0, 1.0, 2.0]) == {"median": 2.0, "ci95": [1.0, 3.0]}
