"""`tools/scst_experiment.py`: the recipe's schedule by default, paired gains over XE only and the old SCST."""

from __future__ import annotations

import pytest
from tools import scst_experiment


def test_the_schedule_defaults_to_the_recipe_and_flags_override_it():
    args = scst_experiment.parse_args(["--seeds", "0", "1"])
    recipe = scst_experiment.yaml.safe_load(args.train_config.read_text())
    assert (args.xe_steps, args.scst_steps) == (recipe["xe_steps"], recipe["scst_steps"])
    args = scst_experiment.parse_args(["--seeds", "0", "1", "--xe-steps", "30", "--scst-steps", "5"])
    assert (args.xe_steps, args.scst_steps) == (30, 5)
    with pytest.raises(SystemExit):
        scst_experiment.parse_args(["--seeds", "3", "3"])  # one distinct seed gives no interval


def test_gains_are_paired_over_seeds():
    runs = {seed: {"XE only": 1.0 + seed, "off-policy sample": 1.1 + seed, "sample": 1.2 + seed + 0.01 * seed,
                   "beam": 1.5 + seed} for seed in range(4)}
    summary = scst_experiment.summarise(runs, list(range(4)))
    assert summary["beam"]["gain_over_xe"]["mean"] == pytest.approx(0.5)
    assert summary["beam"]["gain_over_xe"]["low"] == pytest.approx(0.5)  # the same gain every seed: no width
    sample = summary["sample"]["gain_over_off_policy"]
    assert sample["mean"] == pytest.approx(0.115) and sample["low"] < 0.115 < sample["high"]
    assert summary["XE only"]["sd"] > 1  # the unpaired spread over seeds is far wider than the paired gains
    assert "gain_over_xe" not in summary["XE only"] and "gain_over_off_policy" not in summary["off-policy sample"]


def test_config_overrides_reach_every_run():
    args = scst_experiment.parse_args(["--seeds", "0", "1", "--config-overrides", "memory_prior=true"])
    command = scst_experiment._common(args, 0, args.work_dir / "x")
    assert command[command.index("--config-overrides") + 1] == "memory_prior=true"
    assert "--config-overrides" not in scst_experiment._common(scst_experiment.parse_args(["--seeds", "0", "1"]), 0,
                                                               args.work_dir / "x")
