"""deft-bench around its measurement: the optional modules (the [bench] extra) are named at the start,
--out is checked before any work, and a plot that fails loses neither the table nor the JSON."""

import json
import sys

import pytest

from deft_kernels.benchmarks import worker_count as bench

# One sparsifier, one worker count, one step on NCF (1.9M parameters): about a second.
TINY = ["--model", "ncf", "--workers", "1", "--sparsifiers", "topk", "--repeats", "1", "--warmup", "0",
        "--distinct-gradients", "1", "--train-steps", "0"]
STEM = "worker_count_ncf_cpu"


def _no_work(*args, **kwargs):
    raise AssertionError("the benchmark started working before its arguments were checked")


@pytest.mark.parametrize("module,option", [("tqdm", "--no-progress"), ("matplotlib", "--no-plot")])
def test_missing_optional_module_is_named_at_start_in_one_line(module, option, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    monkeypatch.setattr(bench, "make_workload", _no_work)
    with pytest.raises(SystemExit) as exc:
        bench.main([*TINY, "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert module in err and "pip install 'deft_kernels[bench]'" in err and option in err


def test_runs_without_tqdm_and_matplotlib_when_told_to(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert bench.main([*TINY, "--no-progress", "--no-plot", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{STEM}.json", f"{STEM}.txt"]
    assert "selection time per worker" in capsys.readouterr().out


def test_failing_plot_keeps_the_printed_and_written_table(monkeypatch, tmp_path, capsys):
    def broken_plot(results, config, path):
        raise RuntimeError("no usable backend")

    monkeypatch.setattr(bench, "plot", broken_plot)
    assert bench.main([*TINY, "--no-progress", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    table = (tmp_path / f"{STEM}.txt").read_text()
    assert "selection time per worker" in table and table in out
    assert json.loads((tmp_path / f"{STEM}.json").read_text())["results"][0]["sparsifier"] == "topk"
    assert not (tmp_path / f"{STEM}.png").exists()
    assert "plot skipped (RuntimeError: no usable backend)" in err


def test_out_is_created_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "make_workload", _no_work)
    out = tmp_path / "new" / "results"
    args = bench.parse_args([*TINY, "--out", str(out)])
    assert out.is_dir() and args.out == str(out)


@pytest.mark.parametrize("case", ["under_a_file", "result_is_a_directory"])
def test_unwritable_out_exits_2_before_any_work(case, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "make_workload", _no_work)
    if case == "under_a_file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "results"
        message = "is not a writable directory"
    else:
        (tmp_path / f"{STEM}.json").mkdir()
        out = tmp_path
        message = f"{STEM}.json is a directory"
    with pytest.raises(SystemExit) as exc:
        bench.main([*TINY, "--no-progress", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and message in err


def test_bad_option_creates_no_out_directory(tmp_path, capsys):
    out = tmp_path / "results"
    with pytest.raises(SystemExit):
        bench.parse_args([*TINY, "--repeats", "0", "--out", str(out)])
    assert not out.exists()
    assert "--repeats" in capsys.readouterr().err
