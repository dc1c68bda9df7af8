"""examples/vit_cifar10.py runs end to end (--smoke, synthetic data, tiny ViT): the plain
Torch-Pruning run removes heads and MLP channels, and the decay run reaches the plain run's
shapes (Self-Rectifying off, MLP channels only)."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vit_cifar10.py"
TINY = ["--smoke", "--dataset", "synthetic", "--train-subset", "128", "--test-subset", "64",
        "--batch-size", "64"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("vit_cifar10_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runs(model):
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 32, 32))
    return out.shape == (2, 10) and bool(torch.isfinite(out).all())


def test_base_run_removes_heads_and_mlp_channels(example, capsys):
    r = example.main(TINY + ["--base"])["base"]
    model = r["model"]
    assert [b.attn.num_heads for b in model.blocks] == [1, 1]          # one head per step
    assert [b.attn.qkv.out_features for b in model.blocks] == [48, 48]  # 3 x 1 head x 16
    assert [b.mlp.fc1.out_features for b in model.blocks] == [96, 96]  # half of 192
    assert r["params"][1] < r["params"][0] and r["macs"][1] < r["macs"][0]
    assert 0.0 <= r["acc"][1] <= 1.0 and _runs(model)
    assert "before -> after: params" in capsys.readouterr().out


def test_decay_run_reaches_the_base_shapes_without_self_rectifying(example):
    runs = example.main(TINY + ["--both", "--mlp-only", "--no-sr"])
    base, decay = runs["base"], runs["decay"]
    assert decay["shapes"] == base["shapes"]
    assert decay["params"][1] == base["params"][1] < base["params"][0]
    assert _runs(decay["model"])
