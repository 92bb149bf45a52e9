"""bench/lm.py (the standard-library corpus and the byte-level GPT), bench/cluster_training.py (what
the cluster's time-to-quality scripts share) and bench/cluster_lm.py (its options, its report, and a
dry run end to end on loopback: no root). The full runs are benchmarks, not tests."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import cluster_lm  # noqa: E402
import cluster_training  # noqa: E402
import lm  # noqa: E402
from cluster_training import Method  # noqa: E402


# -- the corpus ----------------------------------------------------------------------------------------------

def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


KEPT = {"os.py": b"import sys\n", "json/__init__.py": b"# json\n", "json/decoder.py": b"x = 1\n",
        "a/b/c.py": b"pass\n", "pydoc_data/topics.py": b"topics = {}\n", "test_like.py": b"# not a test folder\n"}
LEFT_OUT = {"site-packages/pkg/mod.py": b"x\n", "test/test_os.py": b"x\n", "lib2to3/tests/data/bom.py": b"x\n",
            "idlelib/idle_test/t.py": b"x\n", "_sysconfigdata__linux_x86_64-linux-gnu.py": b"build_time_vars = {}\n",
            "encodings/cp1252.py": b'""" Python Character Mapping Codec cp1252 generated from ...\n',
            "README.txt": b"not python\n"}


def test_corpus_files_keep_the_sources_and_leave_out_what_the_docstring_names(tmp_path):
    root = _tree(tmp_path, {**KEPT, **LEFT_OUT})
    assert lm.corpus_files(root) == sorted(KEPT)
    with pytest.raises(ValueError, match="root"):
        lm.corpus_files(tmp_path / "missing")


def test_split_rule_is_the_documented_hash_and_holds_out_about_a_tenth():
    for rel in ["os.py", "json/decoder.py", "asyncio/tasks.py", "x"]:
        expected = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % 100 < 10
        assert lm.is_validation(rel) is expected
        assert lm.is_validation(rel, 99) is (int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % 100 < 99)
    names = [f"pkg{i}/mod{i}.py" for i in range(2000)]
    share = sum(map(lm.is_validation, names)) / len(names)
    assert 0.08 < share < 0.12
    with pytest.raises(ValueError, match="rel_path"):
        lm.is_validation("")
    with pytest.raises(ValueError, match="percent"):
        lm.is_validation("os.py", 100)


def _split_tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    files = {f"m{i}.py": f"# file {i}\nvalue = {i}\n".encode() for i in range(40)}
    assert any(map(lm.is_validation, files)) and not all(map(lm.is_validation, files))
    return _tree(tmp_path, files), files


def test_load_corpus_splits_by_file_joins_in_path_order_and_hashes_the_list(tmp_path):
    root, files = _split_tree(tmp_path)
    c = lm.load_corpus(root)
    names = sorted(files)
    assert c.val_files == [n for n in names if lm.is_validation(n)]
    assert c.train_files == [n for n in names if not lm.is_validation(n)]
    assert bytes(c.train.tolist()) == b"".join(files[n] for n in c.train_files)
    assert bytes(c.val.tolist()) == b"".join(files[n] for n in c.val_files)
    assert c.files_sha256 == hashlib.sha256("\n".join(names).encode()).hexdigest()
    info = c.info()
    assert info["python"] == sys.version.split()[0] and info["files_sha256"] == c.files_sha256
    assert (info["train_files"], info["val_files"]) == (len(c.train_files), len(c.val_files))


def test_load_corpus_is_deterministic_and_its_hashes_see_a_change(tmp_path):
    root, files = _split_tree(tmp_path)
    a, b = lm.load_corpus(root), lm.load_corpus(root)
    assert (a.files_sha256, a.content_sha256) == (b.files_sha256, b.content_sha256)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    (root / "m0.py").write_bytes(b"changed\n")
    c = lm.load_corpus(root)
    assert c.files_sha256 == a.files_sha256 and c.content_sha256 != a.content_sha256
    (root / "new.py").write_bytes(b"x\n")
    assert lm.load_corpus(root).files_sha256 != a.files_sha256


def test_load_corpus_refuses_an_empty_side(tmp_path):
    rel = next(f"only{i}.py" for i in range(100) if not lm.is_validation(f"only{i}.py"))
    _tree(tmp_path, {rel: b"x = 1\n"})
    with pytest.raises(ValueError, match="one side empty"):
        lm.load_corpus(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .py file"):
        lm.load_corpus(tmp_path / "empty")


def test_the_running_pythons_corpus_is_the_stdlib_without_what_is_left_out():
    c = lm.load_corpus()
    assert c.root == lm.stdlib_root() and (c.root / "os.py").is_file()
    everything = c.train_files + c.val_files
    assert "os.py" in everything and len(everything) > 300
    assert not any({"site-packages", "test", "tests", "idle_test"} & set(Path(f).parts) for f in everything)
    assert c.train.numel() > 5 * c.val.numel() > 0


def test_batches_are_the_same_for_the_same_seed_and_targets_are_the_next_byte():
    data = torch.arange(200, dtype=torch.uint8)
    a = lm.batch_starts(torch.Generator().manual_seed(3), 200, 5, 16)
    b = lm.batch_starts(torch.Generator().manual_seed(3), 200, 5, 16)
    assert torch.equal(a, b) and int(a.max()) <= 200 - 17
    x, y = lm.windows(data, a, 16)
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[:, 0], a)
    v = lm.validation_starts(200, 4, 16)
    assert v.tolist() == [0, 61, 122, 183]
    with pytest.raises(ValueError, match="too short"):
        lm.batch_starts(torch.Generator(), 10, 1, 16)


# -- the model -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [lm.GPTConfig(), lm.GPTConfig(16, 32, 2, 4), lm.GPTConfig(8, 24, 1, 3)])
def test_parameter_count_is_the_models(cfg):
    assert lm.parameter_count(cfg) == sum(p.numel() for p in lm.ByteGPT(cfg).parameters())


def test_default_model_size_and_flops():
    cfg = lm.GPTConfig()
    assert lm.parameter_count(cfg) == 3_257_856
    d, t, layers = 256, 128, 4
    assert lm.flops_per_step(cfg, 8) == 3 * (24 * d * d * layers + 4 * t * d * layers + 2 * d * 256) * t * 8


def test_logits_shape_causality_and_a_finite_initial_loss():
    torch.manual_seed(0)
    cfg = lm.GPTConfig(16, 32, 2, 4)
    model = lm.ByteGPT(cfg)
    x = torch.randint(0, 256, (3, 16))
    logits = model(x)
    assert logits.shape == (3, 16, 256)
    assert model(x[:, :5]).shape == (3, 5, 256)
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 256
    assert torch.allclose(model(x2)[:, :10], logits[:, :10]) and not torch.allclose(model(x2)[:, 10], logits[:, 10])
    loss = lm.lm_loss(logits, torch.randint(0, 256, (3, 16)))
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(256)) < 0.5  # near uniform at start
    loss.backward()
    assert model.tok.weight.grad is not None and model.tok.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 17, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 4))


def test_bits_per_byte_and_the_learning_rate_schedule():
    assert lm.bits_per_byte(math.log(2)) == pytest.approx(1.0)
    assert lm.bits_per_byte(math.log(256)) == pytest.approx(8.0)
    lrs = [lm.lr_at(s, 100, 1e-3, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_bad_model_configs_name_the_argument():
    with pytest.raises(ValueError, match="width 30 must be a multiple of heads 4"):
        lm.GPTConfig(16, 30, 1, 4)
    with pytest.raises(ValueError, match="layers"):
        lm.GPTConfig(16, 32, 0, 4)


# -- the shared part: methods and the timed loop ---------------------------------------------------------------

def test_method_table_holds_the_issues_methods():
    table = cluster_lm.METHODS
    assert table["allreduce"].kind == "allreduce"
    assert [table[f"powersgd-r{r}"].rank for r in (1, 4, 16)] == [1, 4, 16]
    for family in ("topk", "deft-ahead", "deft-leader"):
        assert table[f"{family}-1%"].density == 0.01 and table[f"{family}-0.1%"].density == 0.001
    assert table["deft-ahead-1%"].options == {"plan": "ahead"} and table["deft-leader-0.1%"].options == {"plan": "leader"}
    assert all(m.rejected() is None for m in table.values())


def test_a_deft_variant_is_one_entry_and_its_options_reach_deftstate():
    from deft_kernels import planning

    table = cluster_lm.method_table({"deft-cm": {"cost_model": planning.DEFAULT_COST_MODEL}, "deft-bad": {"cost_model": "x"}})
    assert {"deft-cm-1%", "deft-cm-0.1%", "deft-bad-1%", "deft-bad-0.1%"} <= set(table)
    assert table["deft-cm-0.1%"].options == {"cost_model": planning.DEFAULT_COST_MODEL}
    assert table["deft-cm-1%"].rejected() is None
    assert "cost_model='x'" in table["deft-bad-1%"].rejected()


def test_a_method_whose_option_deftstate_rejects_is_skipped_with_the_reason():
    methods = {"deft-1%": Method("deft", density=0.01), "deft-x": Method("deft", density=0.01, options={"no_such": 1})}
    kept, skipped = cluster_training.split_runnable(methods, ["deft-1%", "deft-x"])
    assert kept == ["deft-1%"] and list(skipped) == ["deft-x"]
    assert "no_such=1" in skipped["deft-x"] and "rejects" in skipped["deft-x"]


def test_method_specs_name_their_bad_argument():
    with pytest.raises(ValueError, match="rank"):
        Method("powersgd")
    with pytest.raises(ValueError, match="density"):
        Method("deft", density=2.0)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_timed_training_curve_leaves_evaluations_out_and_counts_steps(one_rank_group, monkeypatch):
    monkeypatch.delenv("DEFT_CLUSTER_NODE", raising=False)
    evaluated = []

    def evaluate(done: int) -> dict:
        evaluated.append(done)
        return {"metric": 10.0 - done}

    run = cluster_training.timed_training(lambda i: float(i), evaluate, steps=5, eval_every=2, warmup=1,
                                          exchanged=lambda done: 4.0 * done)
    assert evaluated == [0, 2, 4, 5]
    assert [p["step"] for p in run["curve"]] == [0, 2, 4, 5]
    assert [p["train_loss"] for p in run["curve"]] == [None, 0.5, 2.5, 4.0]
    assert [p["exchange_bytes"] for p in run["curve"]] == [0.0, 8.0, 16.0, 20.0]
    assert [p["metric"] for p in run["curve"]] == [10.0, 8.0, 6.0, 5.0]
    assert run["curve"][-1]["time_s"] <= run["train_time_s"] and len(run["step_ms"]) == 5
    assert run["curve"][-1]["wire_tx_bytes"] is None and run["median_tx_bytes_per_step"] is None
    assert cluster_training.time_to(run["curve"], "metric", lambda m: m <= 6.0) == run["curve"][2]["time_s"]
    assert cluster_training.time_to(run["curve"], "metric", lambda m: m < 0) is None


# -- the script (its option errors: tests/test_cluster.py, with the other cluster scripts') ----------------------

def _launch(seed: int, date: str, finals: dict[str, list[float]]) -> dict:
    runs = []
    for name, bpbs in finals.items():
        curve = [{"step": 10 * i, "time_s": 10.0 * i, "val_bpb": b, "wire_tx_bytes": 1e6 * i, "exchange_bytes": 0.0}
                 for i, b in enumerate(bpbs)]
        runs.append({"method": name, "spec": cluster_lm.METHODS[name].describe(), "curve": curve,
                     "final_bpb": bpbs[-1], "train_time_s": curve[-1]["time_s"], "median_step_ms": 100.0,
                     "median_tx_bytes_per_step": 2e5, "exchange_bytes_per_step": 1e5})
    corpus = {"python": "3.11.7", "files_sha256": "ab" * 32, "train_files": 2, "train_bytes": 10, "val_files": 1,
              "val_bytes": 5}
    cfg = {"nodes": 2, "bandwidth": "300mbit", "seed": seed, "date": date, "link_goodput_mbps": 290.0, "wall_s": 60,
           "layers": 4, "width": 256, "context": 128, "parameters": 3_257_856, "flops_per_step": 4e10, "batch": 16,
           "steps": 30, "lr": 2e-3, "warmup": 5}
    return {"config": cfg, "runs": runs, "compute_ms": 250.0, "allreduce_alone_ms": 400.0, "corpus": corpus}


def test_summary_targets_allreduce_plus_two_percent_and_keeps_the_latest_launch():
    old = _launch(0, "2026-12-01", {"allreduce": [4.0, 3.0, 2.5, 2.0], "deft-ahead-1%": [4.0, 3.0, 2.9, 2.8]})
    new = _launch(0, "2026-12-02", {"deft-ahead-1%": [4.0, 2.5, 2.04, 2.02], "topk-1%": [4.0, 3.5, 3.0, 2.1]})
    rows = {r["method"]: r for r in cluster_lm.summarize([old, new])}
    assert rows["allreduce"]["target_bpb"] == pytest.approx(2.04)
    assert rows["allreduce"]["time_to_target_s"] == 30.0
    assert rows["deft-ahead-1%"]["time_to_target_s"] == 20.0  # the newer launch's deft
    assert rows["deft-ahead-1%"]["speedup_to_target"] == pytest.approx(1.5)
    assert rows["topk-1%"]["time_to_target_s"] is None
    assert rows["topk-1%"]["final_vs_allreduce"] == pytest.approx(0.05)
    assert rows["allreduce"]["allreduce_over_compute"] == pytest.approx(1.6)
    # all-reduce's loss at the time each method ended: its last evaluation by then
    assert rows["topk-1%"]["allreduce_bpb_then"] == 2.0
    assert cluster_lm._bpb_at(old["runs"][0]["curve"], 25.0) == 2.5
    assert cluster_lm._bpb_at(old["runs"][0]["curve"], 0.0) == 4.0
    text = cluster_lm.table(list(rows.values()), [old, new])
    assert "not reached" in text and "sha256 abababab" in text


def test_report_tables_the_calibrations_of_its_folder(tmp_path, capsys):
    for n, bw, compute, reduce in [(4, "300mbit", 300.0, 600.0), (2, "300mbit", 250.0, 375.0), (2, "1gbit", 250.0, 125.0)]:
        cfg = {"nodes": n, "bandwidth": bw, "link_goodput_mbps": 280.0, "load_average_start": [1.5, 1, 1],
               "date": "2026-12-04 19:00:00 UTC"}
        (tmp_path / f"calibration_n{n}_{bw}_s0.json").write_text(
            json.dumps({"config": cfg, "runs": [], "compute_ms": compute, "allreduce_alone_ms": reduce}))
    assert cluster_lm.report(tmp_path, tmp_path / "out") == 0
    rows = json.loads((tmp_path / "out" / "cluster_lm.json").read_text())["calibration"]
    assert [(r["nodes"], r["bandwidth"]) for r in rows] == [(2, "300mbit"), (2, "1gbit"), (4, "300mbit")]
    assert [r["allreduce_over_compute"] for r in rows] == [1.5, 0.5, 2.0]
    assert "Calibration" in capsys.readouterr().out


def test_report_says_when_there_is_nothing(tmp_path, capsys):
    assert cluster_lm.report(tmp_path / "empty", tmp_path / "out") == 1
    assert "no launches" in capsys.readouterr().err


def test_dry_run_end_to_end_on_loopback(tmp_path):
    """The whole pipeline with a tiny model: torchrun on loopback, every asked method (DEFT with both
    plan protocols), the report."""
    argv = ["--dry-run", "--nodes", "2", "--methods", "allreduce", "powersgd-r1", "deft-ahead-1%", "deft-leader-1%",
            "--timeout", "240",
            "--raw", str(tmp_path / "raw"), "--out", str(tmp_path)]
    assert cluster_lm.main(argv) == 0, (tmp_path / "raw" / "lm_n2_loopback_s0.log").read_text()[-3000:]
    doc = json.loads((tmp_path / "cluster_lm.json").read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert set(rows) == {"allreduce", "powersgd-r1", "deft-ahead-1%", "deft-leader-1%"}
    assert all(math.isfinite(r["final_bpb"]) and r["final_bpb"] < 8.5 for r in rows.values())
    launch = doc["launches"][0]
    assert launch["corpus"]["files_sha256"] == lm.load_corpus().files_sha256
    assert launch["config"]["steps"] == cluster_lm.DRY_RUN["steps"] and launch["config"]["dry_run"]
    # the same batches for every method: after the dense steps (all averaged all-reduces) they agree
    assert launch["runs"][0]["curve"][1]["step"] == launch["config"]["warmup"]
    dense = [r["curve"][1]["val_bpb"] for r in launch["runs"]]
    assert dense == pytest.approx([dense[0]] * len(dense), rel=1e-5), dense
    assert len({r["curve"][-1]["val_bpb"] for r in launch["runs"]}) == len(launch["runs"])
    for deft in ("deft-ahead-1%", "deft-leader-1%"):
        assert rows[deft]["spec"]["options"]["plan"] == deft.split("-")[1]
        assert rows[deft]["exchange_mb_per_step"] < rows["allreduce"]["exchange_mb_per_step"]
    assert (tmp_path / "cluster_lm.png").read_bytes().startswith(b"\x89PNG")
    assert "allreduce" in (tmp_path / "cluster_lm.txt").read_text()


# -- the residual probe (bench/lm_residual.py) -------------------------------------------------------------------

TINY_PROBE = ["--context", "16", "--width", "32", "--layers", "1", "--heads", "2", "--warmup", "3", "--probe-steps",
              "4", "--steps", "20", "--lr-warmup", "2", "--eval-every", "2", "--val-windows", "8", "--threads", "1"]


def test_residual_probe_branches_from_one_dense_state_and_counts_what_each_method_sends(tmp_path):
    import lm_residual
    from deft_kernels import planning

    argv = TINY_PROBE + ["--out", str(tmp_path / "probe"), "--methods"]
    doc = lm_residual.run(lm_residual.parse_args(argv + ["dense", "topk-0.01", "deft-0.01"]))
    alone = lm_residual.run(lm_residual.parse_args(argv + ["deft-0.01"]))
    # every method continues from the same dense state: DEFT's run does not depend on what ran before it
    assert alone["methods"]["deft-0.01"]["curve"] == doc["methods"]["deft-0.01"]["curve"]
    assert doc["methods"]["dense"]["curve"] != doc["methods"]["deft-0.01"]["curve"]
    c = doc["config"]
    assert sum(c["bucket_numel"]) == c["parameters"] == sum(c["group_sizes"].values())
    k = sum(planning.budget(0.01, n) for n in c["bucket_numel"])
    for name, m in doc["methods"].items():
        assert [p["step"] for p in m["curve"]] == [5, 7]
        for s in m["steps"]:
            sent = sum(g.get("sent", 0) for g in s["groups"].values())
            if name == "deft-0.01":  # no build-up: the budget, plus at most one a fragment (each sends >= 1)
                assert k <= sent <= k + 2 * sum(map(len, c["buckets"]))
            elif name == "topk-0.01":
                assert k <= sent <= 2 * k  # the union of two workers' top-k
            for g in s["groups"].values():
                assert g.get("captured2", 0.0) <= g.get("acc2", 0.0) * (1 + 1e-9)
    rows = lm_residual.summary(doc, 4, 7)
    assert rows["dense"]["tok"]["r_over_g"] is None and rows["deft-0.01"]["tok"]["r_over_g"] > 0
    assert sum(v["sent_share"] for v in rows["deft-0.01"].values()) == pytest.approx(1.0)
    assert "deft-0.01" in lm_residual.table(doc)


@pytest.mark.parametrize("bad, message", [(["--methods", "deft-2"], "--methods"), (["--methods", "nope-0.1"], "--methods"),
                                          (["--batch", "15"], "--batch"), (["--probe-steps", "30"], "--probe-steps")])
def test_residual_probe_options_name_the_bad_one(bad, message, capsys):
    import lm_residual

    with pytest.raises(SystemExit):
        lm_residual.parse_args(TINY_PROBE + ["--out", "x"] + bad)
    assert message in capsys.readouterr().err
