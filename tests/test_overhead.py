"""Smoke test of the overhead benchmark (timings themselves are not asserted: the figure is
reported by running the benchmark, not by a timed test)."""

from benchmarks import overhead


def test_overhead_benchmark_runs_and_engine_does_its_work(capsys):
    r = overhead.main(["--batch", "2", "--iters", "1", "--warmup", "0", "--threads", "1"])
    assert r["groups"] == 57  # one per conv of ResNet-56 (55 convs + 2 shortcut convs)
    assert r["decaying"] == r["channels"] // 2
    assert r["hook_sec"] > 0 and r["sec_with"] > 0 and r["sec_without"] > 0
    out = capsys.readouterr().out
    assert "median of paired ratios" in out and "engine hooks alone" in out
    assert "control" in out and r["control_paired_ratio"] > 0


def test_overhead_benchmark_without_control(capsys):
    r = overhead.main(["--batch", "2", "--iters", "2", "--warmup", "0", "--threads", "1",
                       "--no-control", "--capture-clean-grads"])
    assert "control_paired_ratio" not in r and len(r["paired_iqr"]) == 2
    assert "control" not in capsys.readouterr().out
