"""Smoke tests of every ``dpm-bench`` subcommand (``--profile smoke`` on synthetic data).

They never touch /work/shared/data or the network. Frameworks whose adapter package cannot be
imported are skipped (the CLI itself reports them as unavailable).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.cli import build_parser, main
from benchmarks.runners import FRAMEWORKS, available_frameworks

AVAILABLE = [f for f, why in available_frameworks().items() if why is None]
SMOKE = ["--profile", "smoke", "--dataset", "synthetic", "--no-progress", "--threads", "2"]


def _need(fw):
    if fw not in AVAILABLE:
        pytest.skip(f"adapter for {fw} not available")


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    """One smoke comparison (2 seeds, all methods) for the first available framework, reused by
    the compare and plot tests."""
    if not AVAILABLE:
        pytest.skip("no adapter available")
    fw = "depgraph" if "depgraph" in AVAILABLE else AVAILABLE[0]
    out = tmp_path_factory.mktemp("compare")
    rc = main(["compare", "--framework", fw, "--seeds", "0,1", "--out", str(out),
               "--cache-dir", str(out / "cache")] + SMOKE)
    assert rc == 0
    return out, fw


def test_help_for_every_subcommand(capsys):
    parser = build_parser()
    sub = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"][0]
    assert {"quickstart", "run", "compare", "sweep-n", "plot", "overhead"} <= set(sub.choices)
    for name in ("quickstart", "run", "compare", "sweep-n", "plot"):
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "usage:" in text
        # every option has help text
        for action in sub.choices[name]._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "SUBCOMMAND" in capsys.readouterr().out


def test_unknown_model_dataset_framework_method(tmp_path, capsys):
    assert main(["run", "--framework", AVAILABLE[0] if AVAILABLE else "depgraph", "--model", "resnet57",
                 "--out", str(tmp_path)] + SMOKE) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet57'" in err and "resnet56" in err
    assert main(["run", "--framework", "depgraph", "--dataset", "imagenet-fancy", "--profile", "smoke",
                 "--out", str(tmp_path), "--no-progress"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["compare", "--framework", "tensorflow"] + SMOKE)
    assert e.value.code == 2
    assert "unknown framework" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--methods", "sp,magic"] + SMOKE)
    assert "unknown method" in capsys.readouterr().err


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    fw = AVAILABLE[0] if AVAILABLE else "depgraph"
    rc = main(["run", "--framework", fw, "--dataset", "cifar10", "--data-dir", str(tmp_path / "nothing"),
               "--no-download", "--profile", "smoke", "--no-progress", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cifar10 not found" in err and "unpack.py" in err


def test_bad_values(tmp_path, capsys):
    fw = AVAILABLE[0] if AVAILABLE else "depgraph"
    assert main(["run", "--framework", fw, "--ratio", "1.5", "--out", str(tmp_path)] + SMOKE) == 2
    assert "--ratio" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--framework", fw, "--epochs", "0"] + SMOKE)
    assert "positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_run_writes_jsonl_and_result(fw, tmp_path):
    _need(fw)
    out = tmp_path / "run"
    rc = main(["run", "--framework", fw, "--method", "sr", "--seed", "0", "--out", str(out),
               "--cache-dir", str(tmp_path / "cache")] + SMOKE)
    assert rc == 0
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    phases = [rec["phase"] for rec in lines]
    assert phases[0] == "pretrain" and phases[-1] != "pretrain"
    assert all("test_acc" in rec for rec in lines)
    res = json.loads((out / "result.json").read_text())
    for key in ("top1", "flops_pct", "params_pct", "wall_time_s", "counters", "dense_top1", "config"):
        assert key in res
    assert res["framework"] == fw and res["method"] == "sr"
    assert 0 < res["flops_pct"] <= 100.0 and 0 < res["params_pct"] <= 100.0
    assert {"steps", "marked", "released", "zeroed"} <= set(res["counters"])
    trace = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    assert trace and all("sparsity" in t for t in trace)


def test_compare_table_and_paired_differences(compare_dir):
    out, fw = compare_dir
    table = (out / "table.md").read_text()
    for label in ("original", "+SP", "+SR"):
        assert f"| {label} |" in table
    assert "±" in table and "Paired differences" in table and "+SR − original" in table
    summary = json.loads((out / "summary.json").read_text())["summary"]
    (key, entry), = summary.items()
    assert entry["sr"]["seeds"] == [0, 1] and len(entry["sr-original"]["per_seed_top1"]) == 2
    # every run of a seed started from the same pre-trained weights
    (setting,) = [p.name for p in out.iterdir() if p.is_dir() and p.name.startswith(fw)]
    dense = {json.loads((out / setting / f"{m}-s0" / "result.json").read_text())["dense_top1"]
             for m in ("original", "sp", "sr")}
    assert len(dense) == 1
    # original prunes physically at once; the decay methods end physically smaller too
    for m in ("original", "sp", "sr"):
        r = json.loads((out / setting / f"{m}-s0" / "result.json").read_text())
        assert r["flops_pct"] < 100.0 and r["setting"] == setting


def test_sweep_n_and_plot(compare_dir, tmp_path):
    out, fw = compare_dir
    sweep = tmp_path / "sweep"
    rc = main(["sweep-n", "--framework", fw, "--ns", "2,4", "--seeds", "0", "--out", str(sweep),
               "--cache-dir", str(out / "cache")] + SMOKE)
    assert rc == 0
    steps = sorted(json.loads(p.read_text())["steps"] for p in sweep.rglob("result.json")
                   if json.loads(p.read_text())["method"] == "sp")
    assert steps == [2, 4]
    assert main(["plot", str(sweep)]) == 0
    assert list(sweep.glob("fig4_*.png"))
    # --resume: every finished run is read back, nothing runs again; a deleted one reruns
    stamps = {p: p.stat().st_mtime_ns for p in sweep.rglob("result.json")}
    victim = next(p for p in stamps if "N4" in str(p))
    victim.unlink()
    rc = main(["sweep-n", "--framework", fw, "--ns", "2,4", "--seeds", "0", "--out", str(sweep),
               "--cache-dir", str(out / "cache"), "--resume"] + SMOKE)
    assert rc == 0 and victim.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != victim)
    assert main(["plot", str(out), "--out", str(tmp_path / "figs")]) == 0
    pngs = list((tmp_path / "figs").glob("fig5_*.png"))
    assert pngs and pngs[0].stat().st_size > 1000


def test_plot_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "no result.json" in capsys.readouterr().err


def test_quickstart_smoke(tmp_path, capsys):
    if not AVAILABLE:
        pytest.skip("no adapter available")
    fw = ",".join(AVAILABLE[:1])
    rc = main(["quickstart", "--profile", "smoke", "--dataset", "synthetic", "--framework", fw,
               "--out", str(tmp_path), "--no-progress", "--threads", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "framework" in text and "+SP" in text and "+SR" in text and "original" in text
    assert (tmp_path / "table.md").is_file()


@pytest.mark.slow
def test_quickstart_offline_falls_back_to_digits_in_one_line(tmp_path, capsys, monkeypatch):
    if not AVAILABLE:
        pytest.skip("no adapter available")
    monkeypatch.delenv("DPM_DATA", raising=False)
    rc = main(["quickstart", "--profile", "smoke", "--data-dir", str(tmp_path / "none"), "--no-download",
               "--framework", AVAILABLE[0], "--out", str(tmp_path / "o"), "--no-progress", "--threads", "2"])
    assert rc == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "falling back" in line]
    assert len(notes) == 1 and "digits" in notes[0]


def test_unavailable_framework_is_reported(monkeypatch, tmp_path, capsys):
    import benchmarks.runners.base as base

    def broken(self):
        raise base.FrameworkUnavailable(f"framework {self.name!r} not available yet: test")

    monkeypatch.setattr(base.BaseRunner, "check_available", broken)
    for cls in base.BaseRunner.__subclasses__():
        monkeypatch.setattr(cls, "check_available", broken)
    rc = main(["run", "--framework", "otov2", "--out", str(tmp_path)] + SMOKE)
    assert rc == 2
    assert "not available yet" in capsys.readouterr().err


def test_overhead_hook_registered():
    parser = build_parser()
    sub = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"][0]
    assert "overhead" in sub.choices


def test_python_m_benchmarks_help():
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "quickstart" in r.stdout and "sweep-n" in r.stdout
