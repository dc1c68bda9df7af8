"""Exact targets inside ONE group whose tensor is sliced twice: torchvision's ViT.

Torch-Pruning prunes the hidden size of ``nn.MultiheadAttention`` by deleting, for hidden
channel ``c``, rows ``c, c+E, c+2E`` AND column ``c`` of the packed ``in_proj_weight``. All
of them belong to the same DPM group (the hidden-size group), so an element of
``in_proj_weight`` can belong to two channels of that group (its row's and its column's),
or twice to the same channel. With channels of the group decaying at different stages
(two pruning steps two optimizer steps apart: different factors at once) and nothing else
moving the weights (lr = 0), every decaying channel must still be at exactly (N - k) / N
of its initial norm after k steps of its own (the shared-element rule of the
``dpm_core.engine`` docstring), both as the engine measures it and as the norm of the SET
of elements the channel owns, each element once.
"""
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch_pruning as tp

sys.path.insert(0, str(Path(__file__).parent))
from depgraph_families import FAMILIES  # noqa: E402
from dpm_core import DecayConfig  # noqa: E402
from dpm_depgraph import DecayMetaPruner  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
N = 4


def _set_norm(slices, c):
    """Norm of the elements channel ``c`` owns, each counted once (by hand, from the
    slices: a mask per tensor)."""
    masks = {}
    for sl in slices:
        p, dim = sl[0], sl[1]
        pos = torch.tensor([c]) if len(sl) == 2 else sl[2][c]
        m = masks.setdefault(id(p), (p, torch.zeros(p.shape, dtype=torch.bool)))[1]
        idx = [slice(None)] * p.dim()
        idx[dim] = pos
        m[tuple(idx)] = True
    return torch.sqrt(sum(p.detach()[m].double().pow(2).sum() for p, m in masks.values()))


@pytest.mark.parametrize("sliced", [False, True], ids=["stacked", "sliced"])
def test_tv_vit_in_proj_rows_and_columns_of_one_group_decay_exactly(sliced):
    fam = FAMILIES["tv_vit"]
    model, x = fam.build(), fam.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = DecayMetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(),
                                 pruning_ratio=0.5, iterative_steps=2,
                                 decay=DecayConfig(steps=N, self_rectify=False),
                                 **fam.kwargs(model))
    eng = pruner.engine
    if sliced:
        eng.sliced_min_numel = 0
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner.attach(opt)
    attn = model.encoder.layers[0].self_attention
    hidden = next(n for n in eng.groups()
                  if sum(s[0] is attn.in_proj_weight for s in pruner._slices[n]) == 2)
    dims = sorted(s[1] for s in pruner._slices[hidden] if s[0] is attn.in_proj_weight)
    assert dims == [0, 1]                   # rows and columns of in_proj in one group

    marked = {}   # (group, channel) -> (engine L_init, set norm at marking, step count)

    def mark_new():
        for name in eng.groups():
            st = eng.state(name)
            for c in st.decaying.nonzero().squeeze(1).tolist():
                if (name, c) not in marked:
                    marked[(name, c)] = (float(st.l_init[c]),
                                         float(_set_norm(pruner._slices[name], c)),
                                         eng.step_count)

    pruner.step()
    mark_new()
    first = eng.state(hidden).decaying.clone()
    opt.step()
    opt.step()
    pruner.step()                           # nothing is zero yet: no removal
    mark_new()
    second = eng.state(hidden).decaying & ~first
    assert int(first.sum()) > 1 and int(second.sum()) > 0   # two stages in one group
    for _ in range(N):
        opt.step()
        norms = {n: eng._groups[n].sq_norms().sqrt() for n in eng.groups()}
        for (name, c), (l_init, set0, at) in marked.items():
            k = eng.step_count - at
            if k >= N:
                assert float(norms[name][c]) == 0.0
                continue
            want = (N - k) / N
            assert float(norms[name][c]) == pytest.approx(want * l_init, rel=2e-6, abs=0)
            assert float(_set_norm(pruner._slices[name], c)) == pytest.approx(
                want * set0, rel=2e-6, abs=0), (name, c, k)
    assert any(name == hidden for name, _ in marked)
