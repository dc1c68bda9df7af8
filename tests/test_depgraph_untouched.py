"""Building a decay pruner never changes the user's model (issue 11, item 3).

The pruner measures what each Torch-Pruning pruning function deletes by running it on a
meta copy of the layer; that copy must share nothing with the real layer (an LSTM keeps
its weights in a ``_flat_weights`` list that a shallow copy would share).
"""
import warnings

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from dpm_depgraph import DecayConfig, DecayMetaPruner


class Mixed(nn.Module):
    """Grouped convolution, MultiheadAttention and LSTM in one model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.gconv = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.proj = nn.Linear(16, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.pre = nn.Linear(16, 16)
        self.lstm = nn.LSTM(16, 8, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.gconv(self.conv(x).relu())
        t = self.proj(x.flatten(2).transpose(1, 2))
        t = t + self.attn(t, t, t, need_weights=False)[0]
        o, _ = self.lstm(self.pre(t))
        return self.head(o[:, -1])


def _attrs(model):
    """Every plain attribute of every module (embed_dim, num_heads, hidden_size, ...)."""
    return {(n, k): v for n, m in model.named_modules() for k, v in vars(m).items()
            if isinstance(v, (int, float, str, bool, tuple)) or v is None}


@pytest.mark.parametrize("ignore_lstm", [False, True])
def test_building_a_pruner_leaves_the_model_untouched(ignore_lstm):
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(2, 3, 6, 6)
    params = {n: p for n, p in model.named_parameters()}
    values = {n: t.clone() for n, t in model.state_dict().items()}
    attrs = _attrs(model)
    with torch.no_grad():
        y0 = model(x)
    ignored = [model.head] + ([model.lstm] if ignore_lstm else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            DecayMetaPruner(model, x, importance=tp.importance.MagnitudeImportance(),
                            pruning_ratio=0.5, ignored_layers=ignored,
                            decay=DecayConfig(steps=1))
        except (ValueError, RuntimeError):
            pass   # a refusal is fine here; only the model's integrity is tested
    # the same parameter objects, on the same device, with the same values
    assert {n: p for n, p in model.named_parameters()} == params
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(w is getattr(model.lstm, n)
               for w, n in zip(model.lstm._flat_weights, model.lstm._flat_weights_names))
    for n, t in model.state_dict().items():
        assert torch.equal(t, values[n]), n
    assert _attrs(model) == attrs
    with torch.no_grad():
        assert torch.equal(model(x), y0)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(16, 16)
        self.lstm = nn.LSTM(16, 8, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        o, _ = self.lstm(self.pre(x))
        return self.head(o[:, -1])


def test_lstm_hidden_size_torch_pruning_cannot_prune_is_a_clear_error():
    """Plain Torch-Pruning 1.6.1 fails on an LSTM's hidden size (IndexError inside its
    LSTM pruning function); the decay pruner says so at construction and leaves the
    model as it was. With the LSTM in ignored_layers both prune its input alike."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    model = Recurrent()
    values = {n: t.clone() for n, t in model.state_dict().items()}
    kw = dict(importance=tp.importance.MagnitudeImportance(), pruning_ratio=0.5)
    with pytest.raises(ValueError, match="Torch-Pruning cannot prune the group of 'lstm'"):
        DecayMetaPruner(model, x, ignored_layers=[model.head], decay=DecayConfig(steps=1), **kw)
    assert all(torch.equal(t, values[n]) for n, t in model.state_dict().items())
    model(x)

    base = Recurrent()
    base.load_state_dict(model.state_dict())
    tp.pruner.MetaPruner(base, x, ignored_layers=[base.head, base.lstm], **kw).step()
    pruner = DecayMetaPruner(model, x, ignored_layers=[model.head, model.lstm],
                             decay=DecayConfig(steps=1, self_rectify=False), **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner.attach(opt)
    pruner.step()
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    pruner.finalize()
    assert {n: p.shape for n, p in model.named_parameters()} == \
        {n: p.shape for n, p in base.named_parameters()}
    assert model.lstm.weight_ih_l0.shape == (32, 8)
    model(x)
