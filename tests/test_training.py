"""Training end to end on a tiny world: smoke run, save/resume/reload, SIGKILL + exact resume, 2-process refresh."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scripts import train
from conftest import tiny_config, tiny_model
from modeling_fsgr_pma.data.captions import load_caption_split
from modeling_fsgr_pma.data.synthetic import generate_world
from modeling_fsgr_pma.data.tokenization import train_caption_tokenizer
from modeling_fsgr_pma.training.steps import caption_mask, find_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("world")
    generate_world(directory, num_images=48, seed=0, image_size=32)
    config = tiny_config(memory_refresh_every=3, vocab_size=64, num_prototypes=4, memory_tokens_per_step=8,
                         memory_warmup_steps=2)
    config.to_json_file(directory / "model.json")
    captions = [c for caps in load_caption_split(directory, "train")["captions"] for c in caps]
    # BPE training breaks ties randomly: independent runs share one tokenizer to be comparable.
    train_caption_tokenizer(captions, 64).save_pretrained(directory / "tokenizer")
    return directory


def _train_args(world: Path, output: Path, *extra) -> list[str]:
    return [
        "--data", str(world), "--model-config", str(world / "model.json"), "--output-dir", str(output),
        "--batch-size", "8", "--eval-batch-size", "16", "--eval-max-images", "8", "--vocab-size", "64",
        "--warmup-steps", "1", "--kmeans-backend", "torch", "--report-to", "none",
        "--max-new-tokens", "6", "--num-beams", "1", *extra,
    ]


def test_smoke_train_saves_resumes_and_reloads(world, tmp_path):
    output = tmp_path / "run"
    summary = train.main(_train_args(world, output, "--xe-steps", "4", "--scst-steps", "2", "--scst-num-sequences", "2",
                                     "--eval-every", "3", "--checkpoint-every", "2"))
    assert summary["steps"] == 6 and len(summary["history"]) == 2
    assert find_checkpoint(output, "latest").name == "step_6"
    resumed = train.main(_train_args(world, output, "--xe-steps", "6", "--scst-steps", "2", "--scst-num-sequences", "2",
                                     "--eval-every", "3", "--checkpoint-every", "2", "--resume-from-checkpoint",
                                     "latest"))
    assert resumed["steps"] == 8

    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(output / "model", trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(output / "model", trust_remote_code=True)
    assert model.config.lora_merged and any(layer.memory_active for layer in model.memory_layers())
    ids = model.generate(pixel_values=torch.randn(1, 3, 32, 32), max_new_tokens=4)
    assert isinstance(processor.batch_decode(ids, skip_special_tokens=True)[0], str)


def test_a_saved_model_holds_the_prototypes_its_decoder_trained_with(world, tmp_path):
    """Refreshes at steps 2 and 5 (warm-up 2, period 3); evaluations at 5 and 6, each before any refresh of its step.

    Saved at step 5: the prototypes of step 2, which steps 3-5 trained with (checkpoint step_4), not those of the
    refresh at step 5. Saved at step 6: the step-5 prototypes, which step 6 trained with (checkpoint step_6).
    """
    output = tmp_path / "run"
    summary = train.main(_train_args(world, output, "--xe-steps", "6", "--eval-every", "5", "--checkpoint-every", "2",
                                     "--config-overrides", "memory_warmup_steps=2,memory_ramp_steps=2"))
    best_step = max(summary["history"], key=lambda entry: entry["cider"])["step"]  # the first best, as train.py keeps
    released = load_file(output / "model" / "model.safetensors")
    at_step_4 = load_file(output / "checkpoints" / "step_4" / "model.safetensors")
    at_step_6 = load_file(output / "checkpoints" / "step_6" / "model.safetensors")
    trained_with, refreshed_later = (at_step_4, at_step_6) if best_step == 5 else (at_step_6, at_step_4)
    keys = [key for key in released if "prototype_keys" in key]
    assert keys
    for key in keys:
        assert torch.equal(released[key], trained_with[key])
        assert not torch.equal(released[key], refreshed_later[key])


def test_refreshes_happen_in_xe_only_and_never_at_its_last_step():
    args = train.parse_args(["--data", "d", "--output-dir", "o", "--xe-steps", "10", "--scst-steps", "6"])
    config = tiny_config(memory_refresh_every=4, memory_warmup_steps=2)
    assert [step for step in range(1, 17) if train._is_refresh_step(step, args, config)] == [2, 6]


def test_memory_ramp_rises_from_the_first_refresh_to_one():
    config = tiny_config(memory_warmup_steps=2, memory_ramp_steps=4)
    assert [train._memory_ramp(step, config) for step in range(2, 8)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert train._memory_ramp(0, tiny_config()) == 1.0


def test_config_overrides_set_model_fields_and_are_validated(world):
    base = ["--data", "d", "--output-dir", "o", "--model-config", str(world / "model.json")]
    args = train.parse_args([*base, "--config-overrides", "memory_window=7,memory_prior=true,dropout=0.2"])
    config = train.build_config(args, vocab_size=64, concept_names=None)
    assert (config.memory_window, config.memory_prior, config.dropout) == (7, True, 0.2)
    with pytest.raises(ValueError, match="memory_windw"):
        train.build_config(train.parse_args([*base, "--config-overrides", "memory_windw=7"]), 64, None)
    with pytest.raises(ValueError, match="num_prototypes"):  # the overridden config is validated again
        train.build_config(train.parse_args([*base, "--config-overrides", "num_prototypes=100000"]), 64, None)


def test_a_codebook_must_have_num_concepts_names(world):
    args = train.parse_args(["--data", "d", "--output-dir", "o", "--model-config", str(world / "model.json")])
    names = [f"concept {i}" for i in range(12)]  # the world's model.json: num_concepts 12
    assert train.build_config(args, 64, names).concept_names == names
    with pytest.raises(ValueError, match="num_concepts=12"):
        train.build_config(args, 64, names[:5])


def test_unknown_config_key_and_missing_data_are_clear_errors(world, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(bad), "--data", str(world), "--output-dir", str(tmp_path)])


def test_half_written_checkpoint_is_skipped(tmp_path, caplog):
    (tmp_path / "checkpoints" / "step_4").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_4" / "training_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_6.tmp").mkdir()
    (tmp_path / "checkpoints" / "step_8").mkdir()  # no state file: killed before the rename
    assert find_checkpoint(tmp_path, "latest").name == "step_4"
    assert "half-written" in caplog.text


def test_caption_mask_stops_after_first_eos():
    sequences = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 5, 2, 7, 2, 0], [1, 0, 5, 2, 0, 0]])  # a sampled pad is a token
    expected = [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert caption_mask(sequences, eos_token_id=2).tolist() == expected


def _launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_killed_run_resumes_to_identical_weights(world, tmp_path):
    common = ["--xe-steps", "24", "--eval-every", "1000", "--checkpoint-every", "2", "--tokenizer", str(world / "tokenizer"),
              "--config-overrides", "memory_warmup_steps=2,memory_ramp_steps=12"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    first = _launch(_train_args(world, straight, *common))
    second = _launch(_train_args(world, killed, *common))
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step_4").exists():
        assert second.poll() is None, second.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    second.send_signal(signal.SIGKILL)
    second.wait()
    assert second.returncode == -signal.SIGKILL
    assert first.wait(timeout=300) == 0, first.stderr.read()
    shutil.rmtree(killed / "model", ignore_errors=True)
    resumed = _launch(_train_args(world, killed, *common, "--resume-from-checkpoint", "latest"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    final_straight = load_file(straight / "checkpoints" / "step_24" / "model.safetensors")
    final_resumed = load_file(killed / "checkpoints" / "step_24" / "model.safetensors")
    assert final_straight.keys() == final_resumed.keys()
    for key, value in final_straight.items():
        assert torch.equal(value, final_resumed[key]), key


def test_two_processes_refresh_to_identical_prototypes_and_train_without_unused_parameter_search(tmp_path):
    """Two gloo processes (`tests/workers/ddp_refresh.py`) refresh to bitwise-equal prototypes, and train with gradient
    checkpointing under DDP with find_unused_parameters=False (the HF Trainer's setting with gradient checkpointing):
    the steps with an empty memory must not leave its parameters out of the graph (DDP then fails at the next step)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "tests" / "workers" / "ddp_refresh.py"), str(tmp_path),
    ]
    # On a machine without a GPU, --multi_gpu spawns the processes and ACCELERATE_USE_CPU makes them a gloo group.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert not torch.equal(rank0["bank"], rank1["bank"])  # each rank saw different data
    assert torch.equal(rank0["keys"], rank1["keys"]) and torch.equal(rank0["values"], rank1["values"])
    assert rank0["active"] == rank1["active"] == [False, False, False, True, True]
    assert rank0["params"].keys() == rank1["params"].keys()
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name  # DDP kept the replicas in sync


@pytest.mark.parametrize("recipe", sorted((ROOT / "configuration/train").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_training_config_plans_with_its_model_preset(recipe, capsys):
    """Each shipped recipe parses, names a model preset that exists, and prints its plan."""
    plan = train.main(["--config", str(recipe), "--print-schedule"])
    assert json.loads(capsys.readouterr().out) == plan and plan["xe_steps"] + plan["scst_steps"] > 0


def test_print_schedule_reads_the_recipe_and_the_accelerate_config_only(capsys):
    """No --data, no model: the plan of the COCO recipe on 2 nodes of 8 GPUs, in the papers' units."""
    plan = train.main(["--config", str(ROOT / "configuration/train/coco-vit-b16.yaml"), "--print-schedule",
                       "--accelerate-config", str(ROOT / "configuration/accelerate/2node-8gpu.yaml")])
    assert json.loads(capsys.readouterr().out) == plan
    assert (plan["num_processes"], plan["global_batch_size"]) == (16, 96)
    assert plan["xe_steps_per_epoch"] == 566747 // 96 and plan["warmup_steps"] == 3 * plan["xe_steps_per_epoch"]
    assert plan["xe_pair_epochs"] == round(plan["xe_steps"] * 96 / 566747, 3)
    assert plan["backbone_learning_rate"] == pytest.approx(0.1 * plan["learning_rate"])
    assert plan["scst_sequences"] == "beam" and plan["memory_prior"] is False and plan["memory_ramp_steps"] == 0
    assert plan["captions_seen"] == plan["xe_steps"] * 96 + plan["scst_steps"] * 96 * 5
    for key in ("scst_max_epochs", "memory_warmup_steps", "memory_refresh_every", "images_seen"):
        assert plan[key] is not None


def test_pair_epochs_visit_every_caption_once_and_the_collator_uses_it(world):
    from modeling_fsgr_pma.data.captions import CaptionPairs
    from modeling_fsgr_pma.training.steps import CaptionCollator

    images = load_caption_split(world, "train").remove_columns("image").add_column("row", list(range(48)))
    pairs = CaptionPairs(images)
    assert len(pairs) == sum(len(captions) for captions in images["captions"])
    seen = [(pairs[i]["row"], CaptionCollator(processor=None, max_length=16).pick_caption(pairs[i]))
            for i in range(len(pairs))]
    assert sorted(seen) == sorted((row, c) for row, captions in enumerate(images["captions"]) for c in captions)


def test_backbone_adapters_get_their_own_learning_rate():
    model = tiny_model()
    groups = model.param_groups(0.01, 1e-3, 1e-4)
    tower = {id(p) for n, p in model.named_parameters() if n.startswith("model.encoder.tower.") and p.requires_grad}
    assert tower and all((g["lr"] == 1e-4) == (id(g["params"][0]) in tower) for g in groups)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_scst_stops_after_patience_evaluations_without_improvement():
    args = train.parse_args(["--data", "d", "--output-dir", "o", "--xe-steps", "10", "--scst-patience", "2"])
    history = [{"step": 10, "cider": 1.0}, {"step": 12, "cider": 1.2}, {"step": 14, "cider": 1.1}]
    assert not train._patience_exhausted(history, args)
    assert train._patience_exhausted(history + [{"step": 16, "cider": 1.15}], args)
    assert not train._patience_exhausted(history + [{"step": 16, "cider": 1.3}], args)
    assert [train.fsgr_lr_factor(e) for e in range(14)] == [0.25, 0.5, 0.75, 1, 1, 1] + [0.2] * 6 + [0.04] * 2
