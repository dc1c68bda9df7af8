"""The evidence benchmark's machinery (issue 14): dense pre-training with resume and checksums,
the control method, the recovery probe, resumable comparisons, paired statistics and the
command line's help. Synthetic data and one-epoch schedules: no data set, no accuracy claims."""
import json
import math
import os

import pytest
import torch

from benchmarks import experiment as ex
from benchmarks.cli import _claim, build_parser, main
from benchmarks.data import load_dataset, make_loaders
from benchmarks.pretrain import load_checkpoint, pretrain_dense
from benchmarks.runners.base import decay_config, training, train_loop
from benchmarks.stats import paired_summary, t_quantile, verdict


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic")


class _Stop(Exception):
    pass


def test_pretrain_resume_is_bit_exact_and_checksummed(synthetic, tmp_path):
    straight = pretrain_dense("small_cnn", synthetic, 0, tmp_path / "a", tmp_path / "wa", epochs=2,
                              log=lambda m: None)

    def stop_after_first_epoch(msg):
        if "epoch 1/2" in msg:
            raise _Stop

    with pytest.raises(_Stop):
        pretrain_dense("small_cnn", synthetic, 0, tmp_path / "b", tmp_path / "wb", epochs=2,
                       log=stop_after_first_epoch)
    resumed_msgs = []
    resumed = pretrain_dense("small_cnn", synthetic, 0, tmp_path / "b", tmp_path / "wb", epochs=2,
                             log=resumed_msgs.append)
    assert any("resuming after epoch 1/2" in m for m in resumed_msgs)
    a = torch.load(tmp_path / "a" / "small_cnn-synthetic-s0.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "small_cnn-synthetic-s0.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight["sha256"] == resumed["sha256"] and len(resumed["log"]) == 2

    model, meta = load_checkpoint("small_cnn", "synthetic", 0, tmp_path / "a")
    assert meta["recipe"]["epochs"] == 2 and meta["top1"] == straight["top1"]
    assert all(torch.equal(p, a[k]) for k, p in model.state_dict().items())
    with open(tmp_path / "a" / "small_cnn-synthetic-s0.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="SHA-256 differs"):
        load_checkpoint("small_cnn", "synthetic", 0, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="dpm-bench pretrain --model small_cnn --seeds 3"):
        load_checkpoint("small_cnn", "synthetic", 3, tmp_path / "a")
    with pytest.raises(ValueError, match="epochs=2"):
        pretrain_dense("small_cnn", synthetic, 0, tmp_path / "b", tmp_path / "wb", epochs=3,
                       log=lambda m: None)


def test_pretrain_warm_restart_continues_a_finished_cycle(synthetic, tmp_path):
    # --epochs 2 --cycle-epochs 1: the 1-epoch recipe twice; a finished 1-epoch state goes
    # on into the second cycle and ends exactly where the straight two-cycle run ends
    straight = pretrain_dense("small_cnn", synthetic, 0, tmp_path / "a", tmp_path / "wa",
                              epochs=2, cycle_epochs=1, log=lambda m: None)
    first = pretrain_dense("small_cnn", synthetic, 0, tmp_path / "b", tmp_path / "wb", epochs=1,
                           log=lambda m: None)
    assert first["log"][0] == straight["log"][0] | {"epoch_time_s": first["log"][0]["epoch_time_s"]}
    msgs = []
    resumed = pretrain_dense("small_cnn", synthetic, 0, tmp_path / "b", tmp_path / "wb",
                             epochs=2, cycle_epochs=1, log=msgs.append)
    assert any("resuming after epoch 1/2" in m for m in msgs)
    assert resumed["sha256"] == straight["sha256"]
    assert resumed["recipe"]["cycle_epochs"] == 1 and "SGDR" in resumed["recipe"]["schedule"]
    with pytest.raises(ValueError, match="cycle_epochs=3 is longer"):
        pretrain_dense("small_cnn", synthetic, 0, tmp_path / "c", tmp_path / "wc", epochs=2,
                       cycle_epochs=3, log=lambda m: None)


def test_control_is_one_step_decay_without_sr():
    cfg = ex.RunConfig(steps=5, t_rate=0.3, t_len=0.8)
    control = decay_config("control", cfg)
    assert control.steps == 1 and control.self_rectify is False
    assert decay_config("sp", cfg).steps == 5 and decay_config("original", cfg) is None


def test_training_context_sets_precision_and_probe(synthetic):
    train, _ = make_loaders(synthetic, 64, seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen, dtypes = [], []
    model[1].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with training("bf16", probe=lambda step, m: seen.append(step)):
        train_loop(model, train, lambda: opt, epochs=1, base_lr=0.01, progress=False)
    assert seen == list(range(1, len(train) + 1))
    assert set(dtypes) == {torch.bfloat16} and model[1].weight.dtype == torch.float32
    dtypes.clear()
    train_loop(model, train, lambda: opt, epochs=1, base_lr=0.01, progress=False)
    assert set(dtypes) == {torch.float32}
    with pytest.raises(ValueError, match="precision"):
        with training("fp8"):
            pass


def test_recovery_probe_schedule(synthetic):
    cfg = ex.RunConfig(probe_every=20, prune_every=50, iterative_steps=3)
    probe, points = ex.recovery_probe(cfg, synthetic, steps_per_epoch=100)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    for step in range(1, 500):
        probe(step, model)
    steps = [p["step"] for p in points]
    end = 2 * 50 + ex.PROBE_TAIL
    expected = [s for s in range(1, 500)
                if s <= end and (s % 50 in ex.PROBE_OFFSETS or s % 20 == 0)]
    assert steps == expected and {1, 2, 3, 51, 53, 100, 113} <= set(steps)
    assert all(0.0 <= p["acc"] <= 100.0 and math.isfinite(p["loss"]) for p in points)
    assert ex.recovery_probe(ex.RunConfig(probe_every=0), synthetic, 10) == (None, [])


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 19, 30):
        assert t_quantile(df, "0.975") == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)
        assert t_quantile(df, "0.80") == pytest.approx(stats.t.ppf(0.80, df), abs=1e-3)
    assert t_quantile(200, "0.975") == pytest.approx(stats.norm.ppf(0.975), abs=1e-3)


def test_paired_summary():
    s = paired_summary([0.5, 1.0, 1.5, 1.0, 1.0])
    sd = math.sqrt(0.125)
    assert s["mean"] == pytest.approx(1.0) and s["sd"] == pytest.approx(sd)
    half = 2.776 * sd / math.sqrt(5)
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(1 - half), pytest.approx(1 + half))
    assert s["mdd"] == pytest.approx((2.776 + 0.941) * sd / math.sqrt(5))
    assert verdict(s) == "higher (CI excludes 0)"
    assert verdict(paired_summary([-1.0, 1.0, 0.5])) == "no detectable difference"
    assert verdict(paired_summary([1.0])) == "too few seeds"


def test_pooled_differences_average_each_seed_over_like_for_like_settings():
    from benchmarks.experiment import compare_table

    def rec(setting, method, seed, top1, flops=50.0):
        return {"kind": "run", "setting": setting, "framework": setting, "model": "resnet20",
                "dataset": "cifar10", "method": method, "seed": seed, "top1": top1,
                "flops_pct": flops, "params_pct": 50.0, "wall_time_s": 1.0, "counters": {}}

    records = []
    # setting a: +SP - original = +1, 0, +2 (seeds 0-2); setting b: -1, 0 (seeds 0, 1)
    for seed, d in enumerate([1.0, 0.0, 2.0]):
        records += [rec("a", "original", seed, 80.0), rec("a", "sp", seed, 80.0 + d)]
    for seed, d in enumerate([-1.0, 0.0]):
        records += [rec("b", "original", seed, 70.0), rec("b", "sp", seed, 70.0 + d)]
    # setting c's +SR ends at other FLOPs: left out of the pooled +SR difference
    for seed in range(3):
        records += [rec("c", "original", seed, 60.0), rec("c", "sr", seed, 65.0, flops=60.0),
                    rec("a", "sr", seed, 80.5)]
    text, summary = compare_table(records)
    sp = summary["_pooled"]["resnet20/cifar10/sp-original"]
    assert sp["settings"] == ["a", "b"] and sp["seeds"] == [0, 1]   # seed 2: only in a
    assert sp["per_seed_top1"] == pytest.approx([0.0, 0.0])
    assert sp["top1_paired"]["mean"] == pytest.approx(0.0)
    assert "resnet20/cifar10/sr-original" not in summary["_pooled"]   # only a is like-for-like
    assert "Pooled over settings" in text and "| resnet20 | +SP − original | 2 (a, b) | 2 |" in text
    # a single setting: nothing pooled
    _, alone = compare_table([r for r in records if r["setting"] == "a"])
    assert "_pooled" not in alone


def test_claim_lock_and_stale_lock(tmp_path):
    run = tmp_path / "r"
    assert _claim(run)
    assert not _claim(run)                      # our own pid holds it: a live process
    (run / "running.lock").write_text("999999999")   # no such process: stale
    assert _claim(run)


def test_compare_resume_skips_finished_runs(tmp_path, monkeypatch):
    pytest.importorskip("torch_pruning")
    ckpt = tmp_path / "ck"
    monkeypatch.setenv("DPM_CHECKPOINTS", str(ckpt))
    synthetic = load_dataset("synthetic")
    pretrain_dense("small_cnn", synthetic, 0, ckpt, tmp_path / "w", epochs=1, log=lambda m: None)
    out = tmp_path / "out"
    args = ["compare", "--profile", "cifar", "--dataset", "synthetic", "--model", "small_cnn",
            "--framework", "depgraph", "--seeds", "0", "--methods", "original,control", "--epochs", "1",
            "--prune-every", "2", "--iterative-steps", "2", "--out", str(out), "--resume",
            "--threads", "1", "--precision", "fp32"]
    assert main(args) == 0
    first = json.loads((out / "depgraph-magnitude" / "control-s0" / "result.json").read_text())
    assert first["config"]["dense_checkpoints"] == 2 and first["probe"]
    assert first["config"]["channels_last"] is True and first["git_commit"]
    assert not list(out.rglob("running.lock"))
    mtime = os.path.getmtime(out / "depgraph-magnitude" / "original-s0" / "result.json")
    assert main(args) == 0                      # everything done: nothing re-runs
    assert os.path.getmtime(out / "depgraph-magnitude" / "original-s0" / "result.json") == mtime
    table = (out / "table.md").read_text()
    assert "+SP N=1 − original" in table and "95% CI" in table


def test_help_has_no_noise(capsys):
    parser = build_parser()
    sub = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"][0]
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "(default: None)" not in text, name
        assert "%%" not in text, name
        assert "``" not in text and ":mod:`" not in text, name
        for line in text.splitlines():
            assert line.count("(default") <= 1, (name, line)


def test_recovery_table_pairs_seeds_and_finds_the_dip(tmp_path, capsys):
    from benchmarks.recovery_table import main as recovery_main, recovery

    def write(method, seed, dip):
        d = tmp_path / f"{method}-s{seed}"
        d.mkdir()
        probe = [{"step": s, "acc": 80.0, "loss": 0.5} for s in (1, 2, 3, 25, 45, 101, 130)]
        probe[1]["acc"] = dip                     # step 2: the dip after the event at 0
        probe.append({"step": 105, "acc": dip + 1, "loss": 1.0})   # after the event at 100
        (d / "result.json").write_text(json.dumps(
            {"method": method, "seed": seed, "probe": probe, "prune_steps_at": [0, 100]}))

    write("original", 0, 50.0)
    write("original", 1, 60.0)
    write("sp", 0, 70.0)
    write("sp", 1, 74.0)
    write("control", 0, 40.0)
    write("original", 2, 10.0)                    # no +SP partner: left out
    out = recovery(str(tmp_path))
    assert out["original"][0] == [0, 1]
    assert out["original"][1] == [55.0, 56.0]
    assert out["sp"][1] == [72.0, 73.0]
    assert out["control"][0] == [0]
    assert out["original"][2][0] == 80.0          # steps 25 and 45: the 20-60 window
    recovery_main([str(tmp_path)])
    assert "original" in capsys.readouterr().out


def test_epoch_time_times_each_iteration():
    from benchmarks.epoch_time import time_model
    from benchmarks.models import resnet20
    ts = time_model(lambda: resnet20(width=0.25), batch=4, iters=2, warmup=1)
    assert len(ts) == 2 and all(t > 0 for t in ts)
