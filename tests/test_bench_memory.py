"""bench/memory.py: its two measurements on cases with known answers, and the script on a tiny layout
(every default sparsifier and gradient dtype; bounds that hold for any driver)."""

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "memory.py"


@pytest.fixture(scope="module")
def memory():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_allocations_peak_and_held(memory):
    before = torch.empty(1000)  # allocated before the call: neither counted nor its free seen

    def work():
        a = torch.empty(250_000)  # 1 MB
        b = torch.empty(750_000)  # + 3 MB held together: the peak
        del a, b
        c = torch.empty(500_000)  # 2 MB, returned
        torch.empty(100_000)      # 0.4 MB, freed at once
        return c

    result, peak, held = memory.cpu_allocations(work)
    assert (peak, held) == (4_000_000, 2_000_000)
    assert result.numel() == 500_000
    del before
    _, peak, held = memory.cpu_allocations(lambda: None)
    assert (peak, held) == (0, 0)


def test_held_bytes_by_attribute_each_storage_once(memory):
    from deft_kernels.sparsifiers.base import Layout

    base = torch.zeros(100)
    obj = types.SimpleNamespace(residual=base, view=base[10:20], plans=[torch.zeros(3, dtype=torch.int64)],
                                by_name={"x": torch.zeros(5, dtype=torch.bfloat16)}, empty=torch.zeros(0),
                                layout=Layout(1, (100,), torch.float32, torch.device("cpu")),
                                foreign=torch.nn.Linear(2, 2), count=3)
    assert memory.held_bytes(obj) == {"residual": 400, "plans": 24, "by_name": 10}


def run_script(tmp_path, *args):
    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--layout", "synthetic", "--numel", "30000", "--tensors",
                           "5", "--steps", "2", "--out", str(out), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads(out.read_text())


def check_rows(result, sparsifiers, dtypes):
    numel = result["numel"]
    assert numel == 30_000 and result["tensors"] == 5
    assert [(r["sparsifier"], r["grad_dtype"]) for r in result["rows"]] == [(s, d) for s in sparsifiers for d in dtypes]
    for r in result["rows"]:
        kept = r["kept_between_steps_bytes"]
        assert r["kept_between_steps_per_param"] == pytest.approx(sum(kept.values()) / numel)
        if r["sparsifier"] == "dense":
            assert r["residual_dtype"] is None and "residual" not in kept
        else:  # the residual, fp32 by default whatever the gradient's dtype
            assert r["residual_dtype"] == "float32" and kept["residual"] == 4 * numel
            # the step's result lands in the gradient's buffer, but the values it sends (fp32, at
            # least int(d * N) of them) are packed into one of their own
            assert r["step_peak_bytes"] >= 4 * int(0.01 * numel)
        assert 0 <= r["held_after_step_bytes"] <= r["step_peak_bytes"]
        assert r["step_peak_per_param"] == pytest.approx(r["step_peak_bytes"] / numel)


def test_script_on_a_tiny_layout(tmp_path):
    stdout, result = run_script(tmp_path)
    sparsifiers, dtypes = ["deft", "topk", "cltk", "dense"], ["float32", "bfloat16", "float16"]
    check_rows(result, sparsifiers, dtypes)
    assert result["world_size"] == 1 and result["method"].startswith("torch.profiler")
    table = [line.split() for line in stdout.splitlines() if line.split()[:1] and line.split()[0] in sparsifiers]
    assert [(t[0], t[1]) for t in table] == [(s, d) for s in sparsifiers for d in dtypes]
    for line, r in zip(table, result["rows"]):
        assert float(line[3]) == pytest.approx(r["kept_between_steps_per_param"], abs=0.005)


@pytest.mark.slow
def test_script_with_two_gloo_ranks(tmp_path):
    _, result = run_script(tmp_path, "--world-size", "2", "--sparsifiers", "topk", "dense", "--dtypes", "bfloat16",
                           "--timeout", "120")
    check_rows(result, ["topk", "dense"], ["bfloat16"])
    assert result["world_size"] == 2


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--world-size", "0"], "--world-size must be at least 1, got 0"),
    (["--layout", "synthetic", "--numel", "5", "--tensors", "6"], "--tensors must lie in [1, --numel], got 6 for 5"),
    (["--density", "0"], "--density must lie in (0, 1], got 0.0"),
])
def test_script_refuses_bad_arguments(args, message):
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
