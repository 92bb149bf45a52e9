"""deft-bench (deft_kernels.benchmarks.worker_count): the CLI end to end on a small model, its densities and timings
bookkeeping, the simulation against the real step, and its option errors."""

import json
import sys

import pytest
import torch

from deft_kernels import driver, sparsifiers
from deft_kernels.benchmarks import models
from deft_kernels.benchmarks import worker_count as bench

# NCF at its default size: 1.9M parameters, a forward + backward in milliseconds.
SMALL = ["--model", "ncf", "--workers", "1", "2", "--repeats", "2", "--warmup", "1", "--no-progress",
         "--distinct-gradients", "2", "--train-steps", "1"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main([*SMALL, "--out", str(out)]) == 0
    stem = out / "worker_count_ncf_cpu"
    return stem, json.loads(stem.with_suffix(".json").read_text())


def test_cli_writes_table_json_and_png(cli_run):
    stem, doc = cli_run
    assert {"schema", "command", "machine", "config", "summary", "results"} <= set(doc)
    for key in ("cpu_model", "cpu_count", "gpu", "torch", "triton", "deft_kernels", "torch_threads",
                "openmp_threads", "load_average_start", "load_average_end"):
        assert key in doc["machine"], key
    config = doc["config"]
    assert config["model"] == "ncf" and config["workers"] == [1, 2] and config["repeats"] == 2
    assert doc["command"].startswith("deft-bench --model ncf --workers 1 2")
    assert config["numel"] == sum(p.numel() for p in models.build("ncf")[0].parameters())
    assert config["sparsifiers"] == bench.benchable()
    assert {(r["sparsifier"], r["workers"]) for r in doc["results"]} == {
        (name, n) for name in bench.benchable() for n in (1, 2)}
    for r in doc["results"]:
        assert len(r["steps"]) == 2 and r["t_select_ms"] > 0
        assert 0 < r["density"] <= 1 and r["imbalance_measured"] >= 1
    table = stem.with_suffix(".txt").read_text()
    assert "selection time per worker" in table and "sent density" in table
    png = stem.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.pyplot as plt
    assert plt.imread(str(stem.with_suffix(".png"))).shape[0] > 100


def test_critical_path_is_the_protocols(cli_run):
    """Where a leader plans, its plan plus the slowest select; DEFT one step ahead: the slowest select
    (every rank plans, from the previous step's norms: off the path), its plan time reported beside."""
    _, doc = cli_run
    for r in doc["results"]:
        for s in r["steps"]:
            if r["sparsifier"] == "deft":
                assert s["leader"] is None and not s["plan_on_path"] and s["t_plan"] > 0
                assert s["t_select"] == pytest.approx(max(s["t_ranks"]))
                continue
            assert s["leader"] == s["step"] % r["workers"] and s["plan_on_path"]
            expected = max(t + (s["t_plan"] if rank == s["leader"] else 0.0) for rank, t in enumerate(s["t_ranks"]))
            assert s["t_select"] == pytest.approx(expected)
            assert len(s["selected"]) == r["workers"]
        assert r["t_slowest_rank_ms"] <= r["t_select_ms"] + 1e-9


def test_topk_density_is_k_alone_and_grows_with_distinct_workers(cli_run):
    _, doc = cli_run
    topk = {r["workers"]: r for r in doc["results"] if r["sparsifier"] == "topk"}
    budget = topk[1]["budget"]
    assert budget == int(0.01 * doc["config"]["numel"])
    assert all(s["sent"] == budget for s in topk[1]["steps"])
    assert topk[1]["density"] == budget / doc["config"]["numel"]
    # Two workers with different data: the union is larger than k (build-up), at most 2k.
    assert all(budget < s["sent"] <= 2 * budget for s in topk[2]["steps"])
    assert topk[2]["selected_per_worker_mean"] == budget


def test_deft_sent_density_is_its_planned_total(cli_run):
    _, doc = cli_run
    deft = [r for r in doc["results"] if r["sparsifier"] == "deft"]
    assert deft
    for r in deft:
        for s in r["steps"]:
            assert s["planned"] is not None and s["sent"] == s["planned"]
        assert r["density"] == r["sent"] / doc["config"]["numel"]
        assert r["imbalance_model"] is not None
        assert doc["summary"]["by_workers"][str(r["workers"])]["sent_equals_planned"]
        assert r["planned"] == r["budget"]  # local k hands out exactly k here (docs/algorithm.md)
    assert doc["summary"]["density_exact"] and doc["summary"]["density_is_requested"]


@pytest.mark.parametrize("name", bench.benchable())
def test_simulation_of_one_worker_is_the_real_step(name):
    """n = 1 needs no communication: the simulation must send exactly what driver.step sends,
    step after step (the error feedback included)."""
    work = bench.make_workload("ncf", distinct=1, seed=0, device="cpu", train_steps=0)
    options = bench.sparsifier_options(name, bench.calibrated_threshold(work.grads[0], 0.01))
    sim = bench.simulate(name, 0.01, work, 1, warmup=0, repeats=3, options=options)
    sp = sparsifiers.build(bench.registered(name), 0.01, **options)
    real = [driver.step(sp, work.grads[0], sizes=work.sizes)[1] for _ in range(3)]
    assert [s["sent"] for s in sim["steps"]] == [st.sent for st in real]
    assert [s["selected"][0] for s in sim["steps"]] == [st.selected for st in real]


@pytest.mark.parametrize("name", bench.RANK_FREE)
def test_rank_free_sparsifiers_simulate_their_distinct_workers_only(name, monkeypatch):
    """n = 6 workers on 2 distinct gradients: a RANK_FREE sparsifier runs 2 simulated ranks, and sends
    and selects, step after step, exactly what all 6 simulated send and select; the simulation of
    n = 2 stated for 6 workers (what run() reuses) has the same figures."""
    work = bench.make_workload("ncf", distinct=2, seed=0, device="cpu", train_steps=0)
    options = bench.sparsifier_options(name, bench.calibrated_threshold(work.grads[0], 0.01))
    fast = bench.simulate(name, 0.01, work, 6, warmup=1, repeats=3, options=options)
    reused = bench.for_workers(bench.simulate(name, 0.01, work, 2, warmup=1, repeats=3, options=options), 6)
    monkeypatch.setattr(bench, "RANK_FREE", ())
    full = bench.simulate(name, 0.01, work, 6, warmup=1, repeats=3, options=options)
    assert (fast["simulated_ranks"], reused["simulated_ranks"], full["simulated_ranks"]) == (2, 2, 6)
    assert [len(s["t_ranks"]) for s in fast["steps"]] == [2, 2, 2]
    for mine in (fast, reused):
        assert [s["sent"] for s in mine["steps"]] == [s["sent"] for s in full["steps"]]
        assert [[s["selected"][r % 2] for r in range(6)] for s in mine["steps"]] == [s["selected"] for s in full["steps"]]
        for key in ("workers", "shards", "sent", "density", "selected_per_worker_mean", "selected_per_worker_max",
                    "budget"):
            assert mine[key] == full[key], key
    with pytest.raises(ValueError, match="does not stand for 5 workers"):
        bench.for_workers(full, 5)


def test_ranked_sparsifiers_simulate_every_worker():
    work = bench.make_workload("ncf", distinct=2, seed=0, device="cpu", train_steps=0)
    for name in set(bench.benchable()) - set(bench.RANK_FREE):
        assert bench.simulate(name, 0.01, work, 3, warmup=0, repeats=1)["simulated_ranks"] == 3, name


def test_run_simulates_a_rank_free_sparsifier_once_past_its_distinct_gradients(tmp_path, monkeypatch, capsys):
    calls = []
    simulate = bench.simulate
    monkeypatch.setattr(bench, "simulate", lambda name, *a, **k: calls.append((name, a[2])) or simulate(name, *a, **k))
    assert bench.main(["--model", "ncf", "--workers", "1", "2", "4", "8", "--sparsifiers", "deft", "topk",
                       "--repeats", "1", "--warmup", "0", "--distinct-gradients", "2", "--train-steps", "0",
                       "--no-progress", "--no-plot", "--out", str(tmp_path)]) == 0
    assert calls == [("deft", 1), ("topk", 1), ("deft", 2), ("topk", 2), ("deft", 4), ("deft", 8)]
    rows = {(r["sparsifier"], r["workers"]): r for r in json.loads((tmp_path / "worker_count_ncf_cpu.json").read_text())["results"]}
    assert rows[("topk", 8)]["simulation_of_workers"] == 2 and rows[("topk", 8)]["t_select_ms"] == rows[("topk", 2)]["t_select_ms"]
    assert "simulation_of_workers" not in rows[("deft", 8)] and rows[("deft", 8)]["simulated_ranks"] == 8
    assert "topk at n = 4, 8: the figures of n = 2, not simulated again" in capsys.readouterr().out


def test_threshold_is_calibrated_to_k_and_recorded(cli_run):
    g = torch.randn(10_000)
    lam = bench.calibrated_threshold(g, 0.01)
    assert int((g.abs() >= lam).sum()) == 100  # k = int(d * N), no ties in random floats
    _, doc = cli_run
    assert doc["config"]["threshold_calibrated"] and doc["config"]["threshold"] > 0
    with pytest.raises(ValueError, match="needs a threshold"):
        bench.sparsifier_options("threshold", None)
    assert bench.sparsifier_options("topk", None) == {}


def test_cpu_clock_leaves_out_time_the_thread_does_not_run():
    """--clock cpu: a worker preempted (here: sleeping) is charged only for its own CPU time."""
    import time as _time

    from deft_kernels.driver import Laps

    seconds = {}
    for clock in ("wall", "cpu"):
        laps = Laps(bench.CLOCKS[clock])
        laps.start()
        _time.sleep(0.05)
        laps.lap("select")
        seconds[clock] = laps.times["select"]
    assert seconds["wall"] >= 0.05 > 10 * seconds["cpu"]
    work = bench.make_workload("ncf", distinct=1, seed=0, device="cpu", train_steps=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        r = bench.simulate("deft", 0.01, work, 2, warmup=0, repeats=1, clock="cpu")
        assert r["t_select_ms"] > 0
        with pytest.raises(ValueError, match="clock must be one of"):
            bench.simulate("deft", 0.01, work, 2, warmup=0, repeats=1, clock="sundial")
        if threads > 1:
            torch.set_num_threads(2)
            with pytest.raises(ValueError, match="needs a CPU device and one thread"):
                bench.simulate("deft", 0.01, work, 2, warmup=0, repeats=1, clock="cpu")
    finally:
        torch.set_num_threads(threads)


def test_library_functions_name_bad_arguments():
    work = bench.make_workload("ncf", distinct=1, seed=0, device="cpu", train_steps=0)
    for kwargs, message in ((dict(n=0), "n must be an int >= 1"), (dict(warmup=-1), "warmup must be an int >= 0"),
                            (dict(repeats=0), "repeats must be an int >= 1")):
        args = dict(n=1, warmup=0, repeats=1) | kwargs
        with pytest.raises(ValueError, match=message):
            bench.simulate("topk", 0.01, work, args.pop("n"), **args)
    with pytest.raises(TypeError, match="work must be a Workload"):
        bench.simulate("topk", 0.01, work.grads, 1, warmup=0, repeats=1)
    with pytest.raises(ValueError, match="name must be one of"):
        bench.simulate("nope", 0.01, work, 1, warmup=0, repeats=1)
    with pytest.raises(ValueError, match="density must lie in"):
        bench.calibrated_threshold(work.grads[0], 0)
    with pytest.raises(ValueError, match="grad must be a non-empty float tensor"):
        bench.calibrated_threshold(torch.zeros(0), 0.01)
    with pytest.raises(ValueError, match="count must be a positive int"):
        bench.make_workload("ncf", distinct=0, seed=0, device="cpu")


def test_summary_against_made_up_timings():
    def row(n, ms, sent=100, planned=100):
        return {"sparsifier": "deft", "workers": n, "t_select_ms": ms, "density": sent / 10_000, "budget": 100,
                "steps": [{"sent": sent, "planned": planned}]}

    s = bench.summarize([row(1, 8.0), row(2, 4.4), row(4, 2.6), row(32, 1.0)])
    assert s["by_workers"]["2"]["ratio_to_ideal"] == pytest.approx(1.1)
    assert s["by_workers"]["4"]["ratio_to_ideal"] == pytest.approx(1.3)
    assert not s["scaling_target_met"]  # n = 4 is 1.3x its ideal; n = 32 is past the target's range
    assert bench.summarize([row(1, 8.0), row(2, 4.4), row(32, 1.0)])["scaling_target_met"]
    assert not bench.summarize([row(1, 8.0), row(2, 4.0, sent=101)])["density_exact"]
    off_budget = bench.summarize([row(1, 8.0), row(2, 4.0, sent=101, planned=101)])
    assert off_budget["density_exact"] and not off_budget["density_is_requested"]
    assert bench.summarize([{**row(2, 1.0), "sparsifier": "topk"}]) == {}


@pytest.mark.parametrize("argv,message", [
    (["--workers", "0"], "--workers: expected a positive integer"),
    (["--workers", "two"], "--workers: expected a positive integer"),
    (["--workers", "2", "2"], "--workers must not repeat"),
    (["--sparsifiers", "nope"], "--sparsifiers: unknown sparsifier 'nope'"),
    (["--sparsifiers", "dense"], "--sparsifiers: 'dense' selects nothing"),
    (["--sparsifiers", "topk", "topk"], "--sparsifiers must not repeat"),
    (["--density", "0"], r"--density: expected a number in \(0, 1\]"),
    (["--density", "1.5"], r"--density: expected a number in \(0, 1\]"),
    (["--repeats", "0"], "--repeats: expected a positive integer"),
    (["--warmup", "-1"], "--warmup: expected a non-negative integer"),
    (["--threads", "0"], "--threads: expected a positive integer"),
    (["--distinct-gradients", "0"], "--distinct-gradients: expected a positive integer"),
    (["--device", "tpu"], "--device"),
    (["--device", "meta"], "--device must be cpu or cuda"),
    (["--model", "resnet51"], "--model must be one of"),
    (["--seed", "x"], "--seed: invalid int value"),
    (["--threshold", "0"], "--threshold: expected a positive number"),
    (["--clock", "cpu", "--threads", "2"], "--clock cpu times the calling thread"),
    (["--clock", "gpu"], "--clock: invalid choice"),
    (["--threshold", "nan"], "--threshold: expected a positive number"),
])
def test_bad_options_exit_2_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err), message


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_out_must_be_a_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", str(tmp_path / "file")])
    assert "--out" in capsys.readouterr().err


def test_broken_user_factory_exits_2_naming_model(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_factory_mod.py").write_text("def factory():\n    return 3\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--model", "broken_factory_mod:factory", "--workers", "1", "--out", str(tmp_path / "o"),
                    "--no-progress"])
    sys.modules.pop("broken_factory_mod", None)
    assert exc.value.code == 2
    assert "--model broken_factory_mod:factory" in capsys.readouterr().err


def test_output_names():
    assert bench.output_stem("resnet50", "cpu") == "worker_count_resnet50_cpu"
    assert bench.output_stem("resnet50", "cuda:1") == "worker_count_resnet50_cuda"
    assert bench.output_stem("my.models:factory", "cpu", "cpu") == "worker_count_my_models_factory_cpu_cputime"


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "deft-bench"]
    assert ep.value == "deft_kernels.benchmarks.cli:main"


def test_micro_benchmarks_run_from_bench_not_from_tests():
    """`pytest bench/` runs the op micro-benchmarks in one command; the default run (`pytest`,
    `pytest tests`) never collects them."""
    import subprocess
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ini = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert ini["testpaths"] == ["tests"]
    collected = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q"], cwd=root,
                               capture_output=True, text=True, timeout=120)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert "bench/test_bench_ops.py::test_segmented_topk_deft[cpu]" in collected.stdout
    assert "bench/test_bench_ops.py::test_segmented_topk_deft[cuda]" in collected.stdout  # skipped without CUDA


def test_cli_default_mode_is_worker_count(capsys):
    """`deft-bench [options]` with no mode name is the worker-count benchmark; a mode is imported only
    when named."""
    from deft_kernels.benchmarks import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    assert "--workers" in capsys.readouterr().out


def _help(argv, capsys) -> str:
    from deft_kernels.benchmarks import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_mode_with_a_line(capsys):
    from deft_kernels.benchmarks import cli

    out = _help(["--help"], capsys)
    assert out.startswith("usage: deft-bench [MODE] [options]")
    assert set(cli.MODES) == {"worker-count", "project", "cluster"}
    for name, mode in cli.MODES.items():
        assert f"\n  {name:<12}  {mode.summary}\n" in out
    assert "--workers" in _help(["worker-count", "--help"], capsys)  # the default mode by its name
    assert "--preset" in _help(["project", "--help"], capsys)


def test_cluster_help_lists_every_action_with_a_line(capsys):
    from deft_kernels.benchmarks import cluster

    out = _help(["cluster", "--help"], capsys)
    for name in ("run", "torchrun", "check-shaping", "check", "cleanup"):
        assert f"\n  {name:<13}  {cluster.SUBCOMMANDS[name]}\n" in out
    assert cluster.SUBCOMMANDS["check"] in _help(["cluster", "check", "--help"], capsys)


@pytest.mark.parametrize("argv,message", [
    (["bogus"], "deft-bench: error: unknown mode 'bogus': choose from worker-count, project, cluster"),
    (["projet", "--model", "ncf"], "unknown mode 'projet' (did you mean 'project'?): choose from"),
    (["cluster", "bogus"], "deft-bench cluster: error: unknown action 'bogus': choose from run, torchrun, "
                           "check-shaping, check, cleanup"),
])
def test_unknown_mode_or_action_names_the_valid_ones(argv, message, capsys):
    from deft_kernels.benchmarks import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_default_out_is_a_folder_of_the_current_directory_that_git_ignores(tmp_path, monkeypatch, capsys):
    """A run without --out writes into ./deft-bench-results, never into the repository's committed
    bench/results (issue 27: the quickstart in a clone left 5 modified files)."""
    import subprocess
    from pathlib import Path

    from deft_kernels.benchmarks import DEFAULT_OUT, project

    assert DEFAULT_OUT == "deft-bench-results"
    assert bench.build_parser().get_default("out") == project.build_parser().get_default("out") == DEFAULT_OUT
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--model", "ncf", "--workers", "1", "--sparsifiers", "topk", "--repeats", "1", "--warmup", "0",
                       "--distinct-gradients", "1", "--train-steps", "0", "--no-progress", "--no-plot"]) == 0
    assert sorted(p.name for p in (tmp_path / DEFAULT_OUT).iterdir()) == ["worker_count_ncf_cpu.json",
                                                                        "worker_count_ncf_cpu.txt"]
    assert f"wrote {DEFAULT_OUT}/worker_count_ncf_cpu.txt" in capsys.readouterr().out
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout: .gitignore cannot be asked")
    paths = [f"{DEFAULT_OUT}/worker_count_ncf_cpu.json", f"bench/{DEFAULT_OUT}/x.json"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=root, capture_output=True, text=True, timeout=30)
    assert ignored.stdout.split() == paths, ".gitignore must list the default output folder at any depth"


def _code_strings(tree) -> list:
    """The string constants of a module's code: not docstrings, not help= texts."""
    import ast

    prose = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            prose.add(id(body[0].value))
        if isinstance(node, ast.Call):
            prose.update(id(k.value) for k in node.keywords if k.arg == "help")
    skip = {id(m) for node in ast.walk(tree) if id(node) in prose for m in ast.walk(node)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


def test_bench_scripts_write_into_the_default_out_unless_told():
    """Every bench/ script's output option defaults to a path under DEFAULT_OUT, and no other code
    string names bench/results: the committed files change only under an explicit --out."""
    import ast
    from pathlib import Path

    scripts = sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.py"))
    options = 0
    for script in scripts:
        tree = ast.parse(script.read_text())
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "add_argument"):
            if call.args and isinstance(call.args[0], ast.Constant) and call.args[0].value in ("--out", "--out-dir", "--json"):
                default = next((k.value for k in call.keywords if k.arg == "default"), None)
                options += 1
                assert default is None or (isinstance(default, ast.Constant) and default.value is None) or \
                    "DEFAULT_OUT" in ast.unparse(default), f"{script.name}:{call.lineno} {ast.unparse(call)}"
        named = [n.lineno for n in _code_strings(tree) if "bench/results" in n.value]
        assert not named, f"{script.name} names bench/results in code at lines {named}"
    assert options >= 15  # every script that writes has one (a script renamed or gone would show here)


def _bench_script(name: str, *args: str):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / name
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_ddp_lookup_cost_finds_the_model_and_reports():
    done = _bench_script("ddp_lookup_cost.py", "--model", "ncf", "--reps", "2")
    assert done.returncode == 0, done.stderr
    assert "# python bench/ddp_lookup_cost.py --model ncf --reps 2" in done.stdout
    assert "objects tracked; lookup median" in done.stdout and "(first " in done.stdout


@pytest.mark.parametrize("script,args,message", [
    ("ddp_lookup_cost.py", ["--reps", "0"], "--reps must be at least 1, got 0"),
    ("exit_abort.py", ["--runs", "0"], "--runs must be at least 1, got 0"),
    ("convergence.py", ["--sparsifiers", "deft,deft-lead"], "--sparsifiers: unknown ['deft-lead']"),
])
def test_bench_scripts_refuse_bad_counts(script, args, message):
    done = _bench_script(script, *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_digits_convergence_trains_both_deft_protocols():
    """bench/convergence.py's deft-leader is DEFT with plan="leader", deft the default (one step ahead)."""
    import argparse
    from pathlib import Path

    from deft_kernels import sparsifiers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import convergence

    args = argparse.Namespace(threshold=0.02)
    assert convergence.sparsifier_of("deft-leader", args) == ("deft", {"plan": "leader"})
    assert convergence.sparsifier_of("threshold", args) == ("threshold", {"threshold": 0.02})
    for name, protocol in (("deft", "ahead"), ("deft-leader", "leader")):
        sparsifier, options = convergence.sparsifier_of(name, args)
        assert sparsifiers.build(sparsifier, 0.01, **options).plan_protocol == protocol
