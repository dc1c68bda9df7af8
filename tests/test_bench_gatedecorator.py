"""The benchmark's gatedecorator runner: the original's tick rules reach the target."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from benchmarks.data import TensorLoader, _load_synthetic
from benchmarks.models import get_model
from benchmarks.runners.base import RunConfig
from benchmarks.runners.gatedecorator import GateDecoratorRunner

pytestmark = pytest.mark.usefixtures("one_thread")


def _loaders(bs: int = 32):
    ds = _load_synthetic(image_size=16, n_train=128, n_test=64)
    kw = dict(mean=list(ds.mean), std=list(ds.std))
    return (TensorLoader(ds.train_images, ds.train_labels, bs, shuffle=True, **kw),
            TensorLoader(ds.test_images, ds.test_labels, bs, **kw))


@pytest.mark.parametrize("method,flops_eta", [("original", 0.0), ("sr", 0.0), ("original", 1e-4)])
def test_runner_reaches_the_target_in_bn_channel_units(method, flops_eta):
    torch.manual_seed(0)
    model = get_model("resnet20", width=0.25)
    n_bn = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    cfg = RunConfig(framework="gatedecorator", model="resnet20", width=0.25, method=method,
                    epochs=1, batch_size=32, iterative_steps=2, prune_every=1, ratio=0.4,
                    score_batches=2, steps=2, finetune_lr=0.02, extra={"flops_eta": flops_eta})
    res = GateDecoratorRunner().run(model, _loaders(), method, cfg,
                                    example_inputs=torch.randn(1, 3, 16, 16), progress=False)
    info = res.info
    assert info["gate_units"] == n_bn and info["target_units"] == round(0.4 * n_bn)
    assert info["tick_lr"] == pytest.approx(0.002) and info["flops_eta"] == flops_eta
    # each round asks for the deficit in BN-channel units, as the threshold index need - 1;
    # the original's rule prunes at least that (ties and zero-score channels may add a few)
    rounds = info["rounds"]
    assert rounds and info["prune_rounds"] == len(rounds)
    done = 0
    for r in rounds:
        assert r["num"] == r["need"] - 1 and r["units"] >= r["need"]
        if method == "original":  # nothing is released: the deficit is the goal minus the pruned
            assert r["need"] == r["goal"] - done
        done += r["units"]
    assert rounds[-1]["goal"] == info["target_units"]
    assert info["pruned_units"] >= info["target_units"]
    if method == "original":
        assert info["pruned_units"] == done
    # the melted model has exactly the open BN channels left
    left = sum(m.num_features for m in res.model.modules() if isinstance(m, nn.BatchNorm2d))
    assert left == n_bn - info["pruned_units"]
    assert res.trace[-1]["sparsity"] == pytest.approx(info["pruned_units"] / n_bn)
