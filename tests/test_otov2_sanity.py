"""Only-Train-Once's upstream sanity-check suite, ported: tiny, CPU-only, no downloads.

Upstream (``sanity_check/test_*.py`` of the Only-Train-Once repository) builds each model of
``sanity_check/backends``, zeroes random zero-invariant groups, calls ``construct_subnet`` and
checks that the compressed model computes what the full group-sparse model does (max abs
diff <= 1e-4). Here the same architecture kinds (``otov2_sanity_models``) go through that
check three ways, with ``import dpm_otov2`` (its compatibility shims) in force:

* random zero groups (OTO's own ``random_set_zero_groups``, seeded), as upstream;
* a few DHSPG steps without decay (OTOv2's single-step half-space projection);
* a few DHSPG steps with the Decay Pruning Method (``decay=DecayConfig(...)``).

Every case passes when the subnet's output is within 1e-4 of the full model's and the subnet
has fewer parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpm_core import DecayConfig
from dpm_otov2 import OTO

from otov2_sanity_models import SANITY_MODELS, build
from test_otov2_dhspg import subnet_of

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = list(SANITY_MODELS)

#: params upstream's own tests (or this port) mark unprunable because only-train-once 3.0.1
#: mis-prunes them; see docs/otov2.md "Known limits of the 3.0.1 partition".
UNPRUNABLE = {
    # a depthwise conv fed by the model input: OTO prunes its outputs (and groups) but not
    # the input (upstream test_groupconv_case1 marks the same layer)
    "group_conv": ["conv_1.conv1.weight"],
    # a conv feeding PixelShuffle: OTO prunes single channels, PixelShuffle needs blocks of 4
    "carn": ["upsample.0.weight"],
}

# aggressive DHSPG settings so that some groups are zeroed within a few steps
FAST = dict(lr=0.05, lmbda=5.0, epsilon=0.5, start_pruning_step=1, target_group_sparsity=0.4)
DPM = DecayConfig(steps=2, t_rate=0.2, t_len=0.8)
MAX_STEPS = 12


def _oto(kind):
    model, x = build(kind)
    oto = OTO(model, x[:1])
    if kind in UNPRUNABLE:
        oto.mark_unprunable_by_param_names(param_names=UNPRUNABLE[kind])
    return model, oto, x


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_subnet(model, oto, x, tmp_path) -> float:
    """Subnet output == full model's (<= 1e-4) and fewer params; return the max abs diff."""
    n_full = _n_params(model)
    model.eval()
    with torch.no_grad():
        y_full = model(x)
    sub = subnet_of(model, oto, x, tmp_path)  # asserts the 1e-4 bound
    with torch.no_grad():
        diff = (sub(x) - y_full).abs().max().item()
    assert _n_params(sub) < n_full, "the subnet is not smaller"
    return diff


@pytest.mark.parametrize("kind", KINDS)
def test_random_zero_groups_subnet_matches(kind, tmp_path):
    model, oto, x = _oto(kind)
    np.random.seed(0)  # OTO draws the zero groups with numpy
    oto.random_set_zero_groups()
    diff = _check_subnet(model, oto, x, tmp_path)
    print(f"[sanity] {kind} random-zero diff={diff:.2e}")


@pytest.mark.parametrize("decay", [None, DPM], ids=["otov2", "dpm"])
@pytest.mark.parametrize("kind", KINDS)
def test_dhspg_subnet_matches(kind, decay, tmp_path):
    model, oto, x = _oto(kind)
    opt = oto.dhspg(decay=decay, **FAST)
    g = torch.Generator().manual_seed(3)
    model.train()
    for _ in range(MAX_STEPS):
        xb = torch.randn(x.shape, generator=g)
        if kind == "diffusion_unet":
            xb[:, 3] = torch.randint(0, 1000, (x.shape[0], 1, 1), generator=g).float()
        out = model(xb)
        loss = F.mse_loss(out, torch.randn(out.shape, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        done = opt.curr_num_zero_groups > 0
        if done and (opt.engine is None or not opt.engine.any_decaying()):
            break
    assert opt.curr_num_zero_groups > 0, "DHSPG zeroed nothing"
    emptied = [z.name for z in opt.zigs if not bool((z.param_rows().norm(dim=1) > 0).any())]
    if emptied:  # construct_subnet would build 0-channel layers
        pytest.xfail(f"known DHSPG fault (issue 13 item 3, fixed separately in optim.py): "
                     f"every group of {emptied} was zeroed")
    if decay is not None:
        assert opt.engine.counters["zeroed"] > 0
    diff = _check_subnet(model, oto, x, tmp_path)
    print(f"[sanity] {kind} dhspg-{'dpm' if decay else 'otov2'} diff={diff:.2e}")
