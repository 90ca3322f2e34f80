"""The COCO recipe end to end, as the README writes it, on a COCO-shaped synthetic corpus with only sizes changed.

corpus (`make_synthetic.py --layout coco-karpathy`) → codebook → feature cache (SIGKILLed during a shard write,
then resumed) → 2-process gloo training with the real accelerate config (then resumed into SCST) → evaluation on
Karpathy test, the COCO server's val2014 and test2014, nocaps validation and test → results files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig
from safetensors.torch import load_file

from scripts import build_codebook, evaluate_captions, extract_features, make_synthetic
from conftest import tiny_config
from modeling_fsgr_pma.training.clip_backbone import build_clip
from modeling_fsgr_pma.data.feature_cache import load_feature_cache

ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 200  # Karpathy train + restval; 20 in each evaluation part: 340 JPEGs in all

# What the test changes in the README's commands: the model and its CLIP weights (a tiny model, no download;
# train.py takes its model from the recipe's YAML, so the tiny one is added to its arguments)...
REPLACE = {"--model-config": "MODEL_CONFIG", "--clip-pretrained": "CLIP"}
# ...and sizes, appended (argparse keeps the last value).
SIZES = {
    "extract_features": ["--batch-size", "16", "--shard-size", "32", "--num-workers", "0"],
    "train": [
        "--batch-size", "8", "--eval-batch-size", "16", "--eval-max-images", "8", "--eval-every", "3",
        "--checkpoint-every", "3", "--warmup-steps", "1", "--config-overrides", "memory_warmup_steps=2", "--xe-steps", "3",
        "--scst-steps", "0", "--max-caption-length", "24", "--vocab-size", "64", "--num-workers", "0",
    ],
    "evaluate_captions": ["--batch-size", "32"],
}  # fmt: skip
# The second (resumed) training launch goes on into SCST.
RESUME = ["--scst-steps", "2", "--scst-num-sequences", "2", "--eval-every", "5", "--resume-from-checkpoint", "latest"]


def readme_recipe() -> list[list[str]]:
    """The commands of the README's "Train on COCO" block, continuation lines joined; the variables kept."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Train on COCO\n.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split("  #")[0].strip()
        if line and not re.match(r"^[A-Z]+=", line):  # COCO= and OUT= are the test's own
            commands.append(shlex.split(line))
    return commands


def for_here(command: list[str], values: dict[str, str]) -> list[str]:
    """The command with $COCO/$OUT expanded, the REPLACE arguments swapped and the sizes appended."""
    command = [re.sub(r"\$([A-Z]+)", lambda m: values[m.group(1)], token) for token in command]
    for i, token in enumerate(command[:-1]):
        if token in REPLACE:
            command[i + 1] = values[REPLACE[token]]
    script = next(Path(token).stem for token in command if token.endswith(".py"))
    model = ["--model-config", values["MODEL_CONFIG"]] if script == "train" else []
    return command + model + SIZES.get(script, [])


def script_args(command: list[str]) -> tuple[str, list[str]]:
    position = next(i for i, token in enumerate(command) if token.endswith(".py"))
    return Path(command[position]).stem, command[position + 1 :]


def launch(command: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configuration/accelerate/1node-8gpu.yaml ...` with 2 CPU processes.

    The config file is the recipe's; `--num_processes 2` and `ACCELERATE_USE_CPU` (a gloo group) are the only
    changes (`--cpu` would silently start one process).
    """
    assert command[:2] == ["accelerate", "launch"]
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", *command[2:]]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


# Extract, and SIGKILL the process halfway through writing the third shard: two finished shards and a half-written
# `.tmp` file stay behind. A fresh interpreter, not a fork: a forked pytest-xdist worker can inherit a held lock.
KILL_ON_THIRD_SHARD = """
import os, signal, sys
import modeling_fsgr_pma.data.feature_cache as feature_cache
from scripts import extract_features
written, save_file = [], feature_cache.save_file
def save_and_die(tensors, path, metadata=None):
    written.append(path)
    save_file(tensors, path, metadata=metadata)
    if len(written) == 3:
        os.truncate(path, os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
feature_cache.save_file = save_and_die
extract_features.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def values(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("coco_recipe")
    make_synthetic.main(
        ["--layout", "coco-karpathy", "--domain", "synthetic", "--output-dir", str(root / "coco"), "--num-images",
         str(NUM_IMAGES), "--image-size", "48", "--num-workers", "2"]
    )  # fmt: skip
    build = readme_recipe()[0]  # the codebook's vocabulary, as the README names it: the model has its concept count
    vocabulary = ROOT / build[build.index("--vocabulary") + 1]
    concepts = len([line for line in vocabulary.read_text().splitlines() if line.strip() and not line.startswith("#")])
    config = tiny_config(memory_refresh_every=2, num_prototypes=4, memory_tokens_per_step=8, num_concepts=concepts)
    config.to_json_file(root / "model.json")
    torch.manual_seed(0)
    torch.save({"state_dict": build_clip(config.clip_config).state_dict()}, root / "clip.pt")
    return {"COCO": str(root / "coco"), "OUT": str(root / "out"), "MODEL_CONFIG": str(root / "model.json"),
            "CLIP": str(root / "clip.pt")}  # fmt: skip


def test_accelerate_configs_are_ddp_in_bf16():
    for name, machines in (("1node-8gpu", 1), ("2node-8gpu", 2)):
        config = ClusterConfig.from_yaml_file(ROOT / "configuration" / "accelerate" / f"{name}.yaml")
        assert config.distributed_type == "MULTI_GPU" and config.mixed_precision == "bf16"
        assert (config.num_machines, config.num_processes) == (machines, 8 * machines)


def test_the_readme_recipe_runs_end_to_end(values, monkeypatch):
    commands = readme_recipe()
    assert [script_args(c)[0] for c in commands] == ["build_codebook", "extract_features", "train"] + ["evaluate_captions"] * 5
    out = Path(values["OUT"])

    # Codebook
    build_codebook.main(script_args(for_here(commands[0], values))[1])

    # Feature cache: killed by SIGKILL while writing its third shard, then the same command again
    extract = for_here(commands[1], values)
    _, extract_args = script_args(extract)
    killed = subprocess.run([sys.executable, "-c", KILL_ON_THIRD_SHARD, *extract_args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    shards = out / "features" / "train"
    finished = {path.name: path.stat().st_mtime_ns for path in shards.glob("shard-*.safetensors")}
    assert sorted(finished) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert len(list(shards.glob("*.tmp"))) == 1  # the half-written third shard
    extract_features.main(extract_args)
    assert {name: (shards / name).stat().st_mtime_ns for name in finished} == finished  # not redone
    assert not list(shards.glob("*.tmp")) and len(list(shards.glob("shard-*.safetensors"))) == 7  # 200 / 32
    straight = Path(values["OUT"]) / "features-straight"
    extract_features.main([*extract_args, "--output-dir", str(straight)])
    for shard in sorted(shards.glob("shard-*.safetensors")):
        resumed, uninterrupted = load_file(shard), load_file(straight / "train" / shard.name)
        assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted), shard.name
    assert len(load_feature_cache(out / "features", "validation")) == 20

    # Training: 2 processes, the recipe's accelerate config, then resumed into SCST
    train = for_here(commands[2], values)
    first = launch(train)
    assert first.returncode == 0, first.stderr[-4000:]
    resumed = launch(train + RESUME)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resumed from" in resumed.stderr and "step_3" in resumed.stderr
    summary = json.loads((out / "train" / "train_summary.json").read_text())
    assert summary["steps"] == 5 and [entry["step"] for entry in summary["history"]] == [3, 5]
    assert "2 processes" in first.stderr or "Num processes: 2" in first.stderr
    events = load_scalars(out / "train")
    assert {"images_per_s", "tokens_per_s", "loss", "reward"} <= set(events)
    assert len(events["tokens_per_s"]) == 3 and len(events["images_per_s"]) == 5  # no target tokens in SCST

    # Evaluation and the servers' results files
    dataset = json.loads((Path(values["COCO"]) / "dataset_coco.json").read_text())["images"]
    karpathy_test = [image["cocoid"] for image in dataset if image["split"] == "test"]
    expected_ids = {
        "karpathy_test_results.json": karpathy_test,
        "captions_val2014_fsgrpma_results.json": [i["cocoid"] for i in dataset if i["filepath"] == "val2014"],
        "captions_test2014_fsgrpma_results.json": image_ids(values, "annotations/image_info_test2014.json"),
        "nocaps_val_results.json": image_ids(values, "nocaps/nocaps_val_4500_captions.json"),
        "nocaps_test_results.json": image_ids(values, "nocaps/nocaps_test_image_info.json"),
    }
    monkeypatch.setenv("PATH", "")  # no Java: its metrics are tested in test_metrics.py, each JVM costs seconds
    for command in commands[3:]:
        evaluate_captions.main(script_args(for_here(command, values))[1])
    for name, ids in expected_ids.items():
        results = json.loads((out / name).read_text())
        assert [r["image_id"] for r in results] == ids, name
        assert all(isinstance(r["caption"], str) and set(r) == {"image_id", "caption"} for r in results)
    metrics = json.loads((out / "metrics_karpathy_test.json").read_text())
    assert metrics["num_images"] == 20 and metrics["num_beams"] == 5 and metrics["CIDEr"] is not None
    nocaps = json.loads((out / "metrics_nocaps_val.json").read_text())
    assert set(nocaps["per_domain"]) == {"in-domain", "out-domain"}
    assert sum(domain["num_images"] for domain in nocaps["per_domain"].values()) == 20


def image_ids(values: dict[str, str], path: str) -> list[int]:
    return [image["id"] for image in json.loads((Path(values["COCO"]) / path).read_text())["images"]]


def load_scalars(log_dir: Path) -> dict[str, list[float]]:
    """Every scalar TensorBoard logged under `log_dir`, by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[float]] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(event.value for event in accumulator.Scalars(tag))
    return scalars
