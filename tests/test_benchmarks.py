"""The throughput benchmarks run end to end on a tiny model and print the figures they document."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--width", "64", "--depth", "1", "--heads", "2", "--head_width", "64", "--batch", "2", "--scales", "1,2,4",
        "--repeats", "2", "--compute_dtype", "bfloat16"]


def run_benchmark(script, *args):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *TINY, *args],
                          capture_output=True, text=True, timeout=600, check=False,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize("script,extra", [("train_throughput.py", ()), ("sample_throughput.py", ("--num_steps", "2"))])
def test_throughput_benchmarks_report_figures(script, extra):
  figures = run_benchmark(script, *extra)
  assert figures["compute_dtype"] == "bfloat16" and figures["imgs_per_s"] > 0
  if script == "train_throughput.py":
    assert len(figures["step_s_all"]) == 2 and figures["model_gflop_per_step"] > 0
    assert figures["matmul_gflops_float32"] > 0 and figures["matmul_gflops_bfloat16"] > 0
    assert 0 < figures["matmul_limit_fraction_float32"]
  else:
    assert len(figures["call_s_all"]) == 2 and figures["model_gflop_per_img"] > 0


def test_profile_ops_attributes_op_time_to_model_code():
  figures = run_benchmark("profile_ops.py", "--mode", "sample", "--num_steps", "2", "--repeats", "1", "--top", "40")
  assert abs(sum(figures["classes"].values()) - 1) < 1e-3 and figures["op_s_per_call"] > 0
  assert any(kind.startswith("product bf16") for kind in figures["classes"])
  places = " ".join(place for _, place, _ in figures["top"])
  assert "FlowHead.velocity" in places and "HeadBlockV1.__call__" in places
