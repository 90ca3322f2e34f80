"""tools/gpu_check.py: refuses cleanly without CUDA, and its CPU smoke mode runs the recipe's steps in bf16."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.state import AcceleratorState
from tools import gpu_check



def test_cuda_without_a_gpu_exits_2_with_what_to_do(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args([])
    assert exit_info.value.code == 2
    assert "--device cpu --tiny" in capsys.readouterr().err


def test_arguments_are_checked(monkeypatch):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cpu", "--steps", "0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--tiny"])  # the CPU smoke mode is not a GPU measurement
    assert gpu_check.parse_args([]).device == "cuda"


def test_cpu_smoke_run_reports_every_figure(tmp_path):
    # The script sets bf16 when it builds its Accelerator: a state another test of this process left must go.
    AcceleratorState._reset_state(reset_partial_state=True)
    output = tmp_path / "check.json"
    result = gpu_check.main(["--device", "cpu", "--tiny", "--steps", "1", "--output", str(output)])
    assert json.loads(output.read_text()) == result
    assert result["mixed_precision"] == "bf16" and result["preset"] == "tiny"
    assert result["num_beams"] == 5 and result["max_new_tokens"] == 20  # the recipe's decoding
    assert result["train_loss_finite"] and result["train_images_per_s"] > 0 and result["captions_per_s"] > 0
    assert result["caption_tokens"] == 21  # BOS + 20 new tokens
    assert result["train_peak_memory_gib"] is None  # measured on CUDA only
    assert result["scst_sequences"] == "beam" and result["scst_num_sequences"] == 5  # the recipe's SCST
    assert result["scst_loss_finite"] and result["scst_images_per_s"] > 0
    assert result["pair_epoch_complete"] and result["pair_loader_pairs_per_s"] > 0
    AcceleratorState._reset_state(reset_partial_state=True)  # and leave none with bf16 to the next test
