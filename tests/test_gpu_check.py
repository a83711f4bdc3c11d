"""bench/gpu_check.py: skips cleanly without CUDA; its parts and its smoke config work (on the CPU)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check runs instead of skipping")
def test_without_cuda_it_prints_one_skip_line_and_exits_0():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["bench"] == "gpu_check" and result["skipped"] is True and "CUDA" in result["reason"]


def test_unknown_part_is_refused():
    with pytest.raises(SystemExit):
        load_script().main(["--parts", "tests,bogus"])


def test_bf16_peaks_tell_the_hopper_parts_apart():
    peak = load_script().bf16_peak_tflops
    assert peak("NVIDIA H200") == peak("NVIDIA H100 80GB HBM3") == 989.4
    assert peak("NVIDIA H100 PCIe") == 756.0 and peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak("Some Future GPU") is None


def test_smoke_overrides_are_valid_keys_of_cw10_paper():
    from eva_rl.experiment import load_experiment

    config = load_experiment("cw10-paper.yaml", load_script().smoke_overrides("/tmp/x", 400))
    assert config.pretrain.overrides["steps"] == 400 and config.pretrain.overrides["policy"] == {"preset": "paper"}
    assert config.finetune.overrides["train"]["steps"] == 200 and config.finetune.methods == ("lora", "eva")
    assert config.collect.pretrain_episodes == 4 and config.finetune.tasks == ("hammer-v3",)


@pytest.mark.slow
def test_parts_run_on_the_cpu_with_a_tiny_preset(capsys):
    assert load_script().main(["--device", "cpu", "--preset", "tiny", "--batch-size", "8", "--steps", "2",
                               "--eva-batches", "4", "--parts", "throughput,eva"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["skipped"] is False and result["device"] == "cpu"
    assert result["throughput"]["updates_per_second"] > 0 and result["throughput"]["flops_per_update"] > 0
    assert 0.9 < result["eva"]["captured_worst"] <= 1.0 + 1e-6 and result["eva"]["a_device"] == "cpu"
