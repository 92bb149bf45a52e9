"""The emulated cluster (deft_kernels.benchmarks.cluster): its links are shaped to the set rate, real
multi-node torchrun runs DEFT steps over it, and nothing is left behind after a normal exit, an
exception, Ctrl-C on the CLI or a rank killed mid-run.

Needs root and iproute2; elsewhere those tests skip with the one line check_available() gives. The
prefix "dkt<pid>" is this test run's own (benchmarks use others, and two checkouts may run these
tests at once), so a test never touches another cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deft_kernels.benchmarks import cluster as cl
from deft_kernels.benchmarks.cluster import Cluster, bulk_transfer, check_available, cleanup, parse_rate

PREFIX = f"dkt{os.getpid() % 100000}"
WORKER = str(Path(__file__).with_name("cluster_ddp_worker.py"))
MISSING = check_available()
needs_cluster = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def leftovers(prefix: str = PREFIX) -> list[str]:
    """Namespaces of this prefix, and links of this prefix in the root namespace."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split("\n")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout.split("\n")
    names = [line.split()[0] for line in ns if line.strip()]
    names += [line.split(":")[1].strip().split("@")[0] for line in links if line.count(":") >= 2]
    return [n for n in names if n.startswith(f"{prefix}-")]


@pytest.fixture
def clean():
    cleanup(PREFIX)
    yield
    left = leftovers()
    cleanup(PREFIX)
    assert not left, f"left behind: {left}"


# -- no root needed -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,option", [
    (["--nodes", "0", "--", "true"], "--nodes"),
    (["--bandwidth", "fast", "--", "true"], "--bandwidth"),
    (["--prefix", "Bad-Name", "--", "true"], "--prefix"),
    (["--timeout", "-1", "--", "true"], "--timeout"),
    (["check-shaping", "--megabytes", "0"], "--megabytes"),
    (["--nodes", "2"], "no command"),
])
def test_bad_cli_input_is_one_line_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        cl.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and option in err, err


def test_rates_and_names_are_checked():
    assert parse_rate("100mbit") == 1e8 and parse_rate("1gbit") == 1e9 and parse_rate("125mbps") == 1e9
    for bad in ("1 gbit", "0mbit", "gbit", "10gb"):
        with pytest.raises(ValueError, match="tc rate"):
            parse_rate(bad)
    with pytest.raises(ValueError, match="prefix"):
        Cluster(2, prefix="a-b")
    with pytest.raises(ValueError, match="nodes"):
        Cluster(100)


def test_without_root_it_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    missing = check_available()
    assert "root" in missing and "\n" not in missing
    assert cl.main(["--nodes", "2", "--", "true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "root" in err
    with pytest.raises(RuntimeError, match="root"):
        with Cluster(2, prefix=PREFIX):
            pass


# -- on a cluster -----------------------------------------------------------------------------------------

@needs_cluster
@pytest.mark.slow
@pytest.mark.parametrize("rate,megabytes", [("100mbit", 6), ("1gbit", 60)])
def test_bulk_transfer_runs_at_the_set_rate(rate, megabytes, clean):
    with Cluster(2, bandwidth=rate, prefix=PREFIX) as c:
        tx0 = c.counters(0)[0]
        got = bulk_transfer(c, megabytes * 1_000_000, timeout=30)
        sent = c.counters(0)[0] - tx0
        c.set_bandwidth(None)
        unshaped = bulk_transfer(c, megabytes * 1_000_000, timeout=30)
    # TCP payload over 1500-byte frames is 1448/1514 = 95.6% of the wire rate
    assert abs(got / parse_rate(rate) - 1) <= 0.10, f"{got / 1e6:.1f} Mb/s at {rate}"
    assert unshaped > 1.5 * got, f"unshaped {unshaped / 1e6:.0f} Mb/s, shaped {got / 1e6:.0f} Mb/s"
    # the veth counts the frames: the payload plus 66 bytes of headers per 1448 bytes of payload
    assert megabytes * 1e6 <= sent <= megabytes * 1e6 * 1.06


@needs_cluster
def test_layout_and_teardown_after_normal_exit(clean):
    with Cluster(3, bandwidth="1gbit", prefix=PREFIX) as c:
        assert sorted(n for n in leftovers() if n.startswith(f"{PREFIX}-n")) == [f"{PREFIX}-n{i}" for i in range(3)]
        assert [n.address for n in c.nodes] == ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
        qdiscs = c.run(lambda n: ["tc", "qdisc", "show", "dev", n.ifname], timeout=10)
        assert all("tbf" in r.stdout and "rate 1Gbit" in r.stdout for r in qdiscs), qdiscs
        out = c.run(lambda n: ["ip", "-o", "-4", "addr", "show"], timeout=10)
        assert all(f"inet {n.address}/24" in r.stdout and "inet 127.0.0.1" in r.stdout for n, r in zip(c.nodes, out))
        assert all(n.startswith(f"{PREFIX}-") for n in leftovers())  # nothing in the root namespace but names
    assert leftovers() == []


@needs_cluster
def test_teardown_after_an_exception_kills_the_processes(clean):
    with pytest.raises(ZeroDivisionError):
        with Cluster(2, bandwidth=None, prefix=PREFIX) as c:
            p = c.popen(1, ["sleep", "60"])
            1 / 0
    assert p.wait(timeout=5) == -signal.SIGKILL
    assert leftovers() == []


@needs_cluster
def test_find_process_finds_the_node_s_own_process_only(clean):
    with Cluster(2, bandwidth=None, prefix=PREFIX) as c:
        p = c.popen(1, ["sleep", "61"])
        try:
            deadline = time.monotonic() + 5
            while c.find_process(1, "61") is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert c.find_process(1, "61") == p.pid
            assert c.find_process(0, "61") is None  # another node's namespace
            assert c.find_process(1, "61", exclude="sleep") is None
            assert c.find_process(1, "62") is None
        finally:
            p.kill()
            p.wait(timeout=5)


@needs_cluster
def test_run_is_bounded_and_kills_what_overruns(clean):
    with Cluster(2, bandwidth=None, prefix=PREFIX) as c:
        t0 = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired) as exc:
            c.run([["true"], ["sh", "-c", "echo started; sleep 60"]], timeout=1.0)
        assert time.monotonic() - t0 < 10
        assert [r.returncode for r in exc.value.results] == [0, -signal.SIGKILL]
        assert exc.value.results[1].stdout == "started\n"
        assert subprocess.run(["ip", "netns", "pids", c.nodes[1].netns], capture_output=True, text=True).stdout == ""


@needs_cluster
def test_cleanup_matches_its_prefix_exactly(clean):
    other = f"{PREFIX}x-n0"  # a cluster of prefix "<PREFIX>x" must survive cleanup(PREFIX)
    subprocess.run(["ip", "netns", "add", other], check=True)
    try:
        with Cluster(1, prefix=PREFIX):
            pass
        assert cleanup(PREFIX) == []
        assert other in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["ip", "netns", "del", other])


@needs_cluster
@pytest.mark.slow
def test_sigint_to_the_cli_tears_down(clean):
    p = subprocess.Popen([sys.executable, "-m", "deft_kernels.benchmarks.cli", "cluster", "--prefix", PREFIX,
                          "--nodes", "2", "--timeout", "60", "--", "sh", "-c", "echo up {rank}; exec sleep 60"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [p.stdout.readline(), p.stdout.readline()]  # both nodes are running their command
        assert sorted(lines) == ["[n0] up 0\n", "[n1] up 1\n"], lines
        pids = subprocess.run(["ip", "netns", "pids", f"{PREFIX}-n1"], capture_output=True, text=True).stdout.split()
        assert pids
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
    finally:
        p.kill()
    assert p.returncode == 130 and "interrupted" in err, err
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    assert leftovers() == []


@needs_cluster
@pytest.mark.slow
def test_deft_steps_under_multinode_torchrun(clean):
    with Cluster(2, bandwidth="1gbit", prefix=PREFIX) as c:
        before = [c.counters(i) for i in range(2)]
        results = c.run(lambda n: c.torchrun_argv(n.index, [WORKER, "4"], port=29411), timeout=120)
        after = [c.counters(i) for i in range(2)]
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    reports = sorted((json.loads(r.stdout.strip().splitlines()[-1]) for r in results), key=lambda x: x["rank"])
    assert [(x["rank"], x["world"]) for x in reports] == [(0, 2), (1, 2)]
    assert sorted(x["node"] for x in reports) == ["0", "1"]
    for x in reports:
        assert x["same_params"] and x["stats"]["steps"] == 3 and x["buckets"] >= 2
        assert abs(x["stats"]["density"] - 0.05) < 0.01
    # the traffic went over the links: each node sent at least what its exchange says it sent
    for i, x in enumerate(reports):
        node = int(x["node"])
        assert after[node][0] - before[node][0] > x["stats"]["bytes_sent"]


@needs_cluster
@pytest.mark.slow
def test_a_rank_killed_mid_run_ends_the_run_and_leaves_nothing(clean):
    with Cluster(2, bandwidth="1gbit", prefix=PREFIX) as c:
        procs = [c.popen(n.index, c.torchrun_argv(n.index, [WORKER, "100000"], port=29412),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in c.nodes]
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline:  # the training process on node 1, under torchrun
            for pid in subprocess.run(["ip", "netns", "pids", c.nodes[1].netns], capture_output=True,
                                      text=True).stdout.split():
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except FileNotFoundError:
                    continue
                if cmdline and WORKER.encode() in cmdline and b"torch.distributed.run" not in cmdline:
                    victim = int(pid)
            time.sleep(0.2)
        assert victim is not None, "the rank on node 1 never started"
        time.sleep(3)  # mid-run
        os.kill(victim, signal.SIGKILL)
        codes = [p.wait(timeout=60) for p in procs]
        outputs = [p.stdout.read() for p in procs]
        assert all(code != 0 for code in codes), (codes, [o[-2000:] for o in outputs])
    assert leftovers() == []


# -- the cluster benchmarks' own logic (bench/cluster_steps.py, cluster_convergence.py, cluster_lm.py) -------

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.parametrize("script,argv,option", [
    ("cluster_steps", ["--methods", "deft"], "--methods"),
    ("cluster_steps", ["--methods", "deft:2"], "--methods"),
    ("cluster_steps", ["--warmup", "1"], "--warmup"),
    ("cluster_steps", ["--nodes", "x"], "--nodes"),
    ("cluster_steps", ["--tag", "a/b"], "--tag"),
    ("cluster_steps", ["--methods", "deft-ahead:0.01"], "--methods"),
    ("cluster_steps", ["--methods", "deft-leader"], "--methods"),
    ("cluster_convergence", ["--batch", "63", "--nodes", "2"], "--batch"),
    ("cluster_convergence", ["--methods", "sidco"], "--methods"),
    ("cluster_convergence", ["--bandwidth", "1gb"], "--bandwidth"),
    ("cluster_convergence", ["--warmup", "1"], "--warmup"),
    ("cluster_convergence", ["--tag", "a/b"], "--tag"),
    ("cluster_lm", ["--batch", "15", "--nodes", "2"], "--batch"),
    ("cluster_lm", ["--warmup", "1"], "--warmup"),
    ("cluster_lm", ["--warmup", "600", "--steps", "600"], "--warmup"),
    ("cluster_lm", ["--lr-warmup", "10", "--warmup", "5", "--steps", "10"], "--lr-warmup"),
    ("cluster_lm", ["--methods", "sidco"], "--methods"),
    ("cluster_lm", ["--width", "250"], "--width"),
    ("cluster_lm", ["--steps", "0"], "--steps"),
    ("cluster_lm", ["--bandwidth", "1gb"], "--bandwidth"),
    ("cluster_lm", ["--tag", "a/b"], "--tag"),
    ("cluster_lm", ["--report", "--dry-run"], "--dry-run"),
])
def test_bench_scripts_reject_bad_options_in_one_line(script, argv, option, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as exc:
        module.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and option in err, err


def _rank_rows(rank: int, step: dict) -> dict:
    base = {"numel": 1000, "rank": rank, "forward_ms": 1.0, "backward_ms": 2.0, "optimizer_ms": 0.1}
    return {"rank": rank, "node": rank, "rows": [
        {**base, "method": "compute", "density": None, "step_ms": step["compute"] + rank, "wire_tx_bytes": 10,
         "wire_rx_bytes": 10, "exchange_bytes": 0.0},
        {**base, "method": "sync", "density": None, "step_ms": step["sync"], "wire_tx_bytes": 10,
         "wire_rx_bytes": 10, "exchange_bytes": 0.0},
        {**base, "method": "allreduce", "density": None, "step_ms": step["allreduce"], "wire_tx_bytes": 6000,
         "wire_rx_bytes": 6000, "exchange_bytes": 4000.0, "exchange_iso_ms": 50.0 + rank},
        {**base, "method": "deft", "density": 0.01, "step_ms": step["deft"] - rank, "wire_tx_bytes": 100,
         "wire_rx_bytes": 100, "exchange_bytes": 80.0, "exchange_iso_ms": 5.0, "hook_t_select_ms": 1.0,
         "hook_t_comm_ms": 2.0, "hook_t_other_ms": 3.0, "sent_elements": 10.0, "selected_elements": 3.0 + rank}]}


def test_cluster_steps_summary_takes_the_slowest_rank_and_the_ring_model():
    import cluster_steps

    steps = {"compute": 100.0, "sync": 110.0, "allreduce": 160.0, "deft": 121.0}
    run = {"config": {"model": "m", "nodes": 4, "bandwidth": "1gbit", "link_goodput_mbps": 950.0},
           "ranks": [_rank_rows(r, steps) for r in range(4)]}
    rows = {r["label"]: r for r in cluster_steps.summarize(run)}
    assert rows["compute"]["step_ms"] == 103.0  # the slowest rank
    deft = rows["deft 1.0%"]
    assert deft["step_ms"] == 121.0 and deft["exposed_ms"] == 18.0 and deft["step_over_sync"] == 121.0 / 110.0
    assert deft["exchange_iso_ms"] == 5.0
    # all-gather of indices: (n-1) x 8 bytes x the largest part (6); all-reduce of values: 2(n-1)/n x 4 x 10
    assert deft["wire_model_mb"] == pytest.approx((3 * 8 * 6 + 1.5 * 4 * 10) / 1e6)
    assert rows["allreduce"]["wire_model_mb"] == pytest.approx(1.5 * 4000 / 1e6)
    assert rows["allreduce"]["compute_over_allreduce"] == pytest.approx(103.0 / 53.0)
    assert deft["plan"] is None  # measured before DEFT(plan=...): the leader's step
    # a DEFT row that names its plan protocol keeps it, apart from the others, for validate_projection
    for rank in run["ranks"]:
        rank["rows"].append({**next(r for r in rank["rows"] if r["method"] == "deft"), "plan": "ahead"})
    rows = {r["label"]: r for r in cluster_steps.summarize(run)}
    assert rows["deft[ahead] 1.0%"]["plan"] == "ahead" and rows["deft 1.0%"]["plan"] is None


def test_cluster_steps_names_both_deft_protocols_and_their_options_reach_deftstate():
    import cluster_steps

    from deft_kernels import DeftState, sparsifiers

    args = cluster_steps.parse_args(["--methods", "compute", "deft-leader:0.01", "deft:0.01", "topk:0.001"])
    assert args.methods == ["compute", "deft-leader:0.01", "deft:0.01", "topk:0.001"]
    assert cluster_steps.sparsifier_of("deft-leader") == ("deft", {"plan": "leader"})
    assert cluster_steps.sparsifier_of("deft") == ("deft", {})
    for method in ("deft-leader", "deft"):
        name, options = cluster_steps.sparsifier_of(method)
        assert DeftState(sparsifier=name, density=0.01, **options).sparsifier_kwargs == options
        assert sparsifiers.build(name, 0.01, **options).plan_protocol == ("leader" if method == "deft-leader" else "ahead")


def test_cluster_steps_tables_the_leader_protocol_beside_the_default():
    import cluster_steps

    steps = {"compute": 100.0, "sync": 110.0, "allreduce": 160.0, "deft": 121.0}
    ranks = [_rank_rows(r, steps) for r in range(2)]
    for rank in ranks:  # the leader protocol's row, recorded with int32 indices
        leader = {**rank["rows"][-1], "method": "deft-leader", "step_ms": 131.0, "index_bytes": 4}
        rank["rows"].append(leader)
    run = {"config": {"model": "m", "nodes": 2, "bandwidth": "1gbit", "link_goodput_mbps": 950.0}, "ranks": ranks}
    rows = cluster_steps.summarize(run)
    by = {r["label"]: r for r in rows}
    assert by["deft-leader 1.0%"]["step_ms"] == 131.0 and by["deft 1.0%"]["step_ms"] == 121.0
    assert by["deft-leader 1.0%"]["wire_model_mb"] == pytest.approx((1 * 4 * 4 + 1.0 * 4 * 10) / 1e6)
    assert by["deft 1.0%"]["wire_model_mb"] == pytest.approx((1 * 8 * 4 + 1.0 * 4 * 10) / 1e6)  # not recorded: int64
    table = cluster_steps.condensed(rows)
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head[4:] == ["compute", "allreduce", "deft-leader 1.0%", "deft 1.0%", "DEFT leader 1% / compute",
                        "DEFT 1% / compute"]
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[-2:] == [f"{131.0 / 101.0:.2f}", f"{121.0 / 101.0:.2f}"]


def test_cluster_convergence_runs_both_deft_protocols_by_default():
    import cluster_convergence

    args = cluster_convergence.parse_args(["--out", "o"])
    assert {"deft", "deft-leader"} <= set(args.methods) and args.raw == str(Path("o", "cluster_convergence", "raw"))
    table = cluster_convergence.methods({"powersgd_rank": 4, "density": 0.01})
    assert table["deft-leader"].options == {"plan": "leader"} and table["deft"].options == {}
    assert table["deft-leader"].kind == table["deft"].kind == "deft"
    assert all(m.rejected() is None for m in table.values())


def test_cluster_steps_report_reads_the_raw_folder_it_is_given(tmp_path, capsys):
    import cluster_steps

    assert cluster_steps.report(tmp_path / "out", raw=tmp_path / "empty") == 1
    assert str(tmp_path / "empty") in capsys.readouterr().err
    raw = tmp_path / "raw"
    raw.mkdir()
    steps = {"compute": 100.0, "sync": 110.0, "allreduce": 160.0, "deft": 121.0}
    run = {"config": {"model": "m", "nodes": 2, "bandwidth": "1gbit", "link_goodput_mbps": 950.0},
           "ranks": [_rank_rows(r, steps) for r in range(2)]}
    (raw / "m_n2_1gbit.json").write_text(json.dumps(run))
    assert cluster_steps.report(tmp_path / "out", raw=raw) in (0, None)
    rows = json.loads((tmp_path / "out" / "cluster_steps.json").read_text())["rows"]
    assert {(r["model"], r["nodes"], r["method"]) for r in rows} >= {("m", 2, "deft"), ("m", 2, "compute")}


def test_cluster_steps_report_knows_each_rows_plan_protocol():
    """Raw launches made before the rows recorded their plan: ``deft-leader`` ran "leader", and
    ``deft`` beside it ran DEFT's default, the plan one step ahead; a launch without the variant
    ran the leader's step (None); a recorded plan wins. validate_projection prices each as it ran."""
    import cluster_steps
    import validate_projection

    steps = {"compute": 100.0, "sync": 110.0, "allreduce": 160.0, "deft": 121.0}

    def launch(methods, leader_too):
        ranks = [_rank_rows(r, steps) for r in range(2)]
        if leader_too:
            for rank in ranks:
                rank["rows"].append({**next(r for r in rank["rows"] if r["method"] == "deft"), "method": "deft-leader"})
        cfg = {"model": "m", "nodes": 2, "bandwidth": "1gbit", "link_goodput_mbps": 950.0, "methods": methods}
        return {r["label"]: r for r in cluster_steps.summarize({"config": cfg, "ranks": ranks})}

    rows = launch(["compute", "sync", "allreduce", "deft-leader:0.01", "deft:0.01"], True)
    assert rows["deft 1.0%"]["plan"] == "ahead" and rows["deft-leader 1.0%"]["plan"] == "leader"
    assert validate_projection.method_of(rows["deft 1.0%"]) == "deft-ahead"
    assert validate_projection.method_of(rows["deft-leader 1.0%"]) == "deft-leader"
    rows = launch(["compute", "sync", "allreduce", "deft:0.01"], False)
    assert rows["deft 1.0%"]["plan"] is None and validate_projection.method_of(rows["deft 1.0%"]) == "deft-leader"
    assert rows["allreduce"]["plan"] is None
    assert cluster_steps.plan_of("deft") == "ahead" and cluster_steps.plan_of("deft-leader") == "leader"
