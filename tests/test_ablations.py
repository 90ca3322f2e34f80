"""`tools/ablations.py`: variants and sweeps become train.py flags; paired differences and their intervals."""

from __future__ import annotations

import pytest
from scipy import stats
from tools import ablations


def _runs(full: list[float], variant: list[float]) -> dict:
    """Runs whose every metric takes the given per-seed values."""
    def run(value: float) -> dict:
        return {split: {key: value for _, key, _ in ablations.SHAPE_METRICS.values()} for split in ("test", "test_novel")}
    return {"full": {s: run(v) for s, v in enumerate(full)}, "variant": {s: run(v) for s, v in enumerate(variant)}}


def test_paired_difference_and_t_interval():
    full, variant = [1.0, 1.2, 0.9, 1.1, 1.0], [0.8, 1.1, 0.7, 1.0, 0.9]
    summary = ablations.paired_summary(_runs(full, variant), seeds=list(range(5)),
                                       metrics=ablations.SHAPE_METRICS)
    cider = summary["variant"]["CIDEr test"]
    differences = [v - f for v, f in zip(variant, full)]  # -0.2, -0.1, -0.2, -0.1, -0.1: paired, tight
    mean = sum(differences) / 5
    half = stats.t.ppf(0.975, 4) * stats.tstd(differences) / 5**0.5
    assert cider["difference"]["mean"] == pytest.approx(mean)
    assert cider["difference"]["low"] == pytest.approx(mean - half) and cider["difference"]["high"] == pytest.approx(mean + half)
    assert cider["full_better"]  # CIDEr is higher-is-better and the whole interval lies below 0
    assert not summary["variant"]["hallucination test"]["full_better"]  # lower-is-better: the variant is lower
    # The unpaired spread (sd over seeds) is wider than the paired interval: pairing is what makes it tell.
    assert summary["full"]["CIDEr test"]["sd"] > stats.tstd(differences)


def test_an_interval_across_zero_decides_nothing():
    summary = ablations.paired_summary(_runs([1.0, 1.2, 0.9], [1.1, 1.0, 1.0]), seeds=[0, 1, 2],
                                       metrics=ablations.SHAPE_METRICS)
    assert not summary["variant"]["CIDEr test"]["full_better"]
    assert summary["variant"]["CIDEr test"]["difference"]["low"] < 0 < summary["variant"]["CIDEr test"]["difference"]["high"]


def test_sweeps_become_config_overrides_or_train_arguments(tmp_path):
    args = ablations.argparse.Namespace(
        variants=["full", "no memory"], sweeps=[("num_prototypes", ["4", "8"]), ("xe-steps", ["50"])])
    flags = ablations.variant_flags(args)
    assert flags["full"] == [] and flags["no memory"] == ["--config-overrides", "use_memory=false"]
    assert flags["num_prototypes=4"] == ["--config-overrides", "num_prototypes=4"]
    assert flags["xe-steps=50"] == ["--xe-steps", "50"]
    assert ablations.ABLATIONS["XE only"] == ["--scst-steps", "0"]
    assert ablations.parse_sweep("memory_window=20,50") == ("memory_window", ["20", "50"])
    for bad in ("memory_window", "=4", "memory_window=4,"):
        with pytest.raises(ValueError, match="FIELD=V1,V2"):
            ablations.parse_sweep(bad)


def test_missing_demo_outputs_are_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ablations.parse_args(["--demo-dir", str(tmp_path)])
    assert "run scripts/demo.py first" in capsys.readouterr().err


def test_scene_world_ablations_report_every_test_split_and_chair(tmp_path):
    from modeling_fsgr_pma.data import scenes

    scenes.generate_world(tmp_path, num_images=2, seed=0, image_size=32)
    metrics = ablations.metrics_of(tmp_path)
    assert {split for split, _, _ in metrics.values()} == {"test", "test_novel", "test_out_domain"}
    assert {key for _, key, _ in metrics.values()} >= {"CIDEr", "chair_i", "object_recall", "relation_error_rate"}


def test_a_metric_undefined_in_some_run_is_reported_as_such():
    runs = _runs([1.0, 1.2, 0.9], [1.1, 1.0, 1.0])
    runs["variant"][1]["test_novel"]["reference_cross_entropy"] = None
    summary = ablations.paired_summary(runs, seeds=[0, 1, 2], metrics=ablations.SHAPE_METRICS)
    assert summary["variant"]["reference CE test_novel"] is None and summary["full"]["reference CE test_novel"]
    assert "n/a" in ablations.markdown(summary, [0, 1, 2])


def test_runs_of_an_earlier_report_with_the_same_settings_are_not_repeated(tmp_path):
    variants = {"full": [], "no memory": ["--config-overrides", "use_memory=false"]}
    report = {"train_args": "--xe-steps 300", "test_images": 400,
              "variants": {"full": [], "no memory": ["--config-overrides", "use_memory=true"]},  # other flags then
              "runs": {"full": {"0": {"test": {"CIDEr": 1.0}}}, "no memory": {"0": {"test": {"CIDEr": 0.9}}}}}
    output = tmp_path / "report.json"
    output.write_text(ablations.json.dumps(report))
    args = ablations.argparse.Namespace(output=output, train_args="--xe-steps 300", test_images=400)
    assert ablations.recorded_runs(args, variants) == {("full", 0): {"test": {"CIDEr": 1.0}}}
    args.train_args = "--xe-steps 200"  # another schedule: nothing is reused
    assert ablations.recorded_runs(args, variants) == {}
    assert ablations.recorded_runs(ablations.argparse.Namespace(output=tmp_path / "none.json"), variants) == {}


@pytest.mark.parametrize("variant", sorted(ablations.ABLATIONS))
def test_every_variant_is_a_train_py_command_line_that_changes_what_it_names(variant, tmp_path):
    from conftest import tiny_config
    from scripts import train

    model_config = tmp_path / "model.json"
    tiny_config(memory_prior=False, memory_ramp_steps=0).to_json_file(model_config)
    base = ["--data", "d", "--output-dir", "o", "--model-config", str(model_config)]
    args = train.parse_args([*base, *ablations.ABLATIONS[variant]])  # argparse exits on a flag it does not know
    config = train.build_config(args, vocab_size=64, concept_names=None)
    changed = {
        "full": (config.use_memory, config.use_fsgr, config.memory_prior) == (True, True, False),
        "no memory": not config.use_memory,
        "log-prior memory": (config.memory_prior, config.memory_ramp_steps) == (True, 100),
        "no FSGR": not config.use_fsgr,
        "no SupCon": config.supcon_weight == 0.0,
        "XE only": args.scst_steps == 0,
    }
    assert changed[variant]


def test_a_failed_run_does_not_cancel_the_others_and_is_named(tmp_path, monkeypatch):
    for name in ("data/world.json", "clip.safetensors", "codebook.safetensors", "features/x", "train/tokenizer/x"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    ran = []

    def run_variant(args, world, name, flags, seed):
        ran.append((name, seed))
        if (name, seed) == ("no memory", 0):
            raise RuntimeError("train.py failed; see seed0/no_memory/train.log")
        return {}

    monkeypatch.setattr(ablations, "ablation_world", lambda demo_dir, test_images: tmp_path)
    monkeypatch.setattr(ablations, "run_variant", run_variant)
    with pytest.raises(SystemExit) as failed:
        ablations.main(["--demo-dir", str(tmp_path), "--seeds", "0", "1", "--variants", "full", "no memory",
                        "--output", str(tmp_path / "report.json")])
    assert "1 of 4 runs failed" in str(failed.value) and "seed0/no_memory/train.log" in str(failed.value)
    assert sorted(ran) == [("full", 0), ("full", 1), ("no memory", 0), ("no memory", 1)]
    assert not (tmp_path / "report.json").exists()
