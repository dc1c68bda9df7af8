"""Comparing nested training state (dicts, lists, tensors) exactly, for the reliability tests."""

import torch


def state_diff(a, b, path="") -> list:
    """Paths where two nested dict/list/tensor structures differ (empty: identical)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
              and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))
        return [] if ok else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [path + "{keys}"]
        return [d for k in a for d in state_diff(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [path + "[len]"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in state_diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]
