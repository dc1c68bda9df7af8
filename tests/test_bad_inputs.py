"""The README's table of bad inputs: every row is a case here, and the table must match.

Each case builds a bad input, checks the exception type and that the message says what
is wrong, and the last test checks that README.md lists exactly these cases with these
messages (so the documentation cannot drift from the behaviour).
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dpm_core import DecayConfig, DecayEngine

README = Path(__file__).resolve().parents[1] / "README.md"


def _param(*shape):
    return nn.Parameter(torch.randn(*shape))


def _engine_with(w, **cfg):
    e = DecayEngine(DecayConfig(**cfg))
    e.add_group("g", [(w, 0)])
    return e


def _tiny_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


# ---------------------------------------------------------------- the cases
# (id, what the user did, callable raising, exception type, message excerpt shown in README)
def c_steps_zero():
    DecayConfig(steps=0)


def c_steps_float():
    DecayConfig(steps=2.5)


def c_t_len_negative():
    DecayConfig(t_len=-1)


def c_t_rate_nan():
    DecayConfig(t_rate=float("nan"))


def c_t_rate_one():
    DecayConfig(t_rate=1.0, self_rectify=True)


def c_t_rate_below():
    DecayConfig(t_rate=-1.5, self_rectify=True)


def c_engine_dict_config():
    DecayEngine({"steps": 5})


def c_m_mismatch():
    DecayEngine().add_group("g", [(_param(4, 3), 0), (_param(5, 3), 0)])


def c_scalar_param():
    e = DecayEngine()
    e.add_group("g", [(nn.Parameter(torch.tensor(1.0)), 0)])


def c_non_leaf():
    w = _param(4, 3)
    DecayEngine().add_group("g", [(w * 2, 0)])


def c_duplicate_group():
    w = _param(4, 3)
    e = _engine_with(w)
    e.add_group("g", [(w, 0)])


def c_index_out_of_range():
    DecayEngine().add_group("g", [(_param(4, 6), 1, torch.tensor([[0, 1], [2, 6]]))])


def c_optimizer_missing_params():
    w = _param(4, 3)
    _engine_with(w).attach(torch.optim.SGD([_param(2)], lr=0.1))


def c_add_group_after_attach_missing():
    e = DecayEngine()
    e.attach(torch.optim.SGD([_param(2)], lr=0.1))
    e.add_group("g", [(_param(4, 3), 0)])


def c_mark_unknown_group():
    _engine_with(_param(4, 3)).mark("conv9", [0])


def c_mark_out_of_range():
    _engine_with(_param(4, 3)).mark("g", [7])


def c_mark_nonfinite():
    w = _param(4, 3)
    with torch.no_grad():
        w[1, 0] = float("nan")
    _engine_with(w).mark("g", [1])


def c_load_other_shape():
    sd = _engine_with(_param(4, 3)).state_dict()
    _engine_with(_param(6, 3)).load_state_dict(sd)


def c_load_other_steps():
    w = _param(4, 3)
    sd = _engine_with(w, steps=3).state_dict()
    _engine_with(w, steps=5).load_state_dict(sd)


def c_attach_twice():
    w = _param(4, 3)
    e = _engine_with(w)
    e.attach(torch.optim.SGD([w], lr=0.1))
    e.attach(torch.optim.SGD([w], lr=0.1))


def _gd(decay=None, score=True):
    from dpm_gatedecorator import GateDecorator
    m = _tiny_cnn()
    gd = GateDecorator(m, torch.randn(2, 3, 8, 8), decay=decay)
    if score:
        with gd.scoring():
            m(torch.randn(4, 3, 8, 8)).sum().backward()
    return m, gd


def c_gd_no_bn():
    from dpm_gatedecorator import GateDecorator
    GateDecorator(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                nn.Flatten(), nn.Linear(4, 2)), torch.randn(2, 3, 8, 8))


def c_gd_no_scores():
    _gd(score=False)[1].prune(2)


def c_gd_too_many():
    _gd()[1].prune(100)


def c_gd_decay_no_attach():
    _gd(decay=DecayConfig())[1].prune(2)


def c_gd_optimizer_too_early():
    from dpm_gatedecorator import GateDecorator
    m = _tiny_cnn()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    GateDecorator(m, torch.randn(2, 3, 8, 8), decay=DecayConfig()).attach(opt)


def _decay_pruner(decay, model=None, inputs=None):
    import torch_pruning as tp
    from dpm_depgraph import DecayMetaPruner
    m = model or _tiny_cnn()
    return m, DecayMetaPruner(m, torch.randn(1, 3, 8, 8) if inputs is None else inputs,
                              importance=tp.importance.MagnitudeImportance(),
                              pruning_ratio=0.5, ignored_layers=[m[8]], decay=decay)


def c_dg_step_before_attach():
    _decay_pruner(DecayConfig())[1].step()


def c_dg_foreign_optimizer():
    _decay_pruner(DecayConfig())[1].attach(torch.optim.SGD(nn.Linear(2, 2).parameters(),
                                                           lr=0.1))


def c_dg_decay_dict():
    _decay_pruner({"steps": 3})


def c_dg_untraceable():
    _decay_pruner(DecayConfig(), inputs=torch.randn(1, 5, 8, 8))  # 5 channels into a 3-channel conv


def c_dg_prune_group_not_a_group():
    from dpm_depgraph import prune_group
    _, pruner = _decay_pruner(DecayConfig())
    prune_group(pruner.DG, "features.3")


def c_dg_ratio_over_one():
    import torch_pruning as tp
    from dpm_depgraph import DecayMetaPruner
    m = _tiny_cnn()
    DecayMetaPruner(m, torch.randn(1, 3, 8, 8), importance=tp.importance.MagnitudeImportance(),
                    pruning_ratio=1.5, ignored_layers=[m[8]], decay=DecayConfig())


def c_dg_head_ratio_negative():
    import torch_pruning as tp
    from dpm_depgraph import DecayMetaPruner
    m = _tiny_cnn()
    DecayMetaPruner(m, torch.randn(1, 3, 8, 8), importance=tp.importance.MagnitudeImportance(),
                    head_pruning_ratio=-0.1, ignored_layers=[m[8]], decay=DecayConfig())


def c_dg_classifier_pruned():
    import warnings

    import torch_pruning as tp
    from dpm_depgraph import DecayMetaPruner
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # the warning as the raised "error"
        DecayMetaPruner(_tiny_cnn(), torch.randn(1, 3, 8, 8),
                        importance=tp.importance.MagnitudeImportance(), decay=DecayConfig())


def c_dg_gqa_sdpa():
    transformers = pytest.importorskip("transformers")
    import torch_pruning as tp
    from dpm_depgraph import DecayMetaPruner
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa"))
    a = m.model.layers[0].self_attn
    DecayMetaPruner(m, torch.randint(0, 64, (1, 8)), importance=tp.importance.MagnitudeImportance(),
                    ignored_layers=[m.lm_head], num_heads={a.q_proj: 4, a.k_proj: 2, a.v_proj: 2},
                    prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5,
                    output_transform=lambda out: out.logits.sum(), decay=DecayConfig())


def c_attach_scheduler():
    opt = torch.optim.SGD(_tiny_cnn().parameters(), lr=0.1)
    DecayEngine().attach(torch.optim.lr_scheduler.StepLR(opt, 10))


def c_hf_plain_pruner():
    pytest.importorskip("transformers")
    import torch_pruning as tp
    from dpm_depgraph.hf import DecayPruningCallback
    m = _tiny_cnn()
    DecayPruningCallback(tp.pruner.MetaPruner(m, torch.randn(1, 3, 8, 8),
                                              importance=tp.importance.MagnitudeImportance(),
                                              ignored_layers=[m[8]]))


def c_hf_restore_not_a_checkpoint():
    pytest.importorskip("transformers")
    import tempfile

    import torch_pruning as tp
    from dpm_depgraph import DecayMetaPruner
    from dpm_depgraph.hf import DecayPruningCallback
    m = _tiny_cnn()
    pruner = DecayMetaPruner(m, torch.randn(1, 3, 8, 8),
                             importance=tp.importance.MagnitudeImportance(),
                             ignored_layers=[m[8]])
    with tempfile.TemporaryDirectory() as d:
        DecayPruningCallback(pruner).restore(d)


def _oto():
    from dpm_otov2 import OTO
    return OTO(_tiny_cnn(), torch.randn(1, 3, 8, 8))


def c_oto_decay_int():
    _oto().dhspg(lr=0.1, target_group_sparsity=0.5, decay=5)


def c_oto_target():
    _oto().dhspg(lr=0.1, target_group_sparsity=1.5)


def c_oto_variant():
    _oto().dhspg(lr=0.1, variant="rmsprop")


def c_oto_adaptive_pool_size():
    from dpm_otov2 import OTO
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(), nn.Linear(4 * 49, 2))
    OTO(model, torch.randn(1, 3, 8, 8))  # a 4x4 map cannot be pooled to 7x7 by ONNX


def c_oto_subnet_optimizer_early():
    oto = _oto()
    oto.subnet_optimizer(torch.optim.SGD(oto._model.parameters(), lr=0.1))


def c_oto_subnet_optimizer_foreign():
    import tempfile
    oto = _oto()
    with contextlib.redirect_stdout(io.StringIO()):
        oto.construct_subnet(out_dir=tempfile.mkdtemp())
    oto.subnet_optimizer(torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1))
def c_oto_tolerance():
    _oto().dhspg(lr=0.1, target_group_sparsity=0.3, tolerance_group_sparsity=0.5)


def c_oto_unreachable():
    _oto().dhspg(lr=0.1, target_group_sparsity=0.95)  # 2 x 8 groups, each layer keeps one


def c_oto_l1_sgd():
    _oto().dhspg(lr=0.1, weight_decay=1e-4, weight_decay_type="l1_norm")


def c_oto_moment_init_sgd():
    _oto().dhspg(lr=0.1, moment_init="zero")


def c_oto_start_and_both_steps():
    _oto().dhspg(lr=0.1, start_pruning_step=3, partition_step=1, half_space_project_steps=2)


def c_oto_cooldown_no_decay():
    _oto().dhspg(lr=0.1, release_cooldown=5)


def c_oto_adam_dampening():
    _oto().dhspg(lr=0.1, variant="adam", dampening=0.1)


CASES = [
    ("config-steps-zero", "`DecayConfig(steps=0)`", c_steps_zero, ValueError,
     "DecayConfig.steps must be an int >= 1"),
    ("config-steps-float", "`DecayConfig(steps=2.5)`", c_steps_float, ValueError,
     "DecayConfig.steps must be an int >= 1"),
    ("config-t-len-negative", "`DecayConfig(t_len=-1)`", c_t_len_negative, ValueError,
     "DecayConfig.t_len must be >= 0"),
    ("config-t-rate-nan", "`DecayConfig(t_rate=nan)`", c_t_rate_nan, ValueError,
     "DecayConfig.t_rate must be a finite float"),
    ("config-t-rate-one", "`DecayConfig(t_rate=1.0, self_rectify=True)`: never releases",
     c_t_rate_one, ValueError, "t_rate must lie in [-1, 1) with self_rectify=True"),
    ("config-t-rate-below", "`DecayConfig(t_rate=-1.5, self_rectify=True)`: C_len alone decides",
     c_t_rate_below, ValueError, "t_rate must lie in [-1, 1) with self_rectify=True"),
    ("engine-dict-config", "`DecayEngine({'steps': 5})`", c_engine_dict_config, TypeError,
     "DecayEngine expects a dpm_core.DecayConfig"),
    ("group-m-mismatch", "slices with 4 and 5 channels in one group", c_m_mismatch,
     ValueError, "all slices must agree on M"),
    ("group-non-leaf", "a computed tensor (`w * 2`) as a slice", c_non_leaf, ValueError,
     "is not a leaf tensor"),
    ("group-scalar", "a 0-dim tensor (a scalar parameter) as a slice", c_scalar_param,
     ValueError, "is a 0-dim tensor"),
    ("group-duplicate", "the same group name twice", c_duplicate_group, ValueError,
     "already exists"),
    ("group-index-range", "an index slice pointing past the tensor", c_index_out_of_range,
     ValueError, "index values must lie in [0, 6)"),
    ("attach-missing-params", "attaching an optimizer that does not hold the group",
     c_optimizer_missing_params, ValueError, "is not among the attached optimizer's parameters"),
    ("add-group-after-attach", "adding a group the attached optimizer does not hold",
     c_add_group_after_attach_missing, ValueError,
     "is not among the attached optimizer's parameters"),
    ("attach-twice", "attaching a second optimizer without removing the first",
     c_attach_twice, RuntimeError, "already attached to another optimizer"),
    ("mark-unknown-group", "`mark('conv9', ...)` for a group never added",
     c_mark_unknown_group, KeyError, "no group named 'conv9'"),
    ("mark-out-of-range", "`mark('g', [7])` on a 4-channel group", c_mark_out_of_range,
     ValueError, "channel indices must lie in [0, 4)"),
    ("mark-nonfinite", "marking a channel whose weights hold NaN", c_mark_nonfinite,
     ValueError, "have non-finite weights"),
    ("load-other-shape", "engine `load_state_dict` into a model of another shape",
     c_load_other_shape, ValueError, "does not match this model's"),
    ("load-other-steps", "engine `load_state_dict` with a different N", c_load_other_steps,
     ValueError, "the checkpoint was made with steps=3"),
    ("gd-no-batchnorm", "`GateDecorator` on a model without BatchNorm", c_gd_no_bn,
     ValueError, "GateDecorator found no BatchNorm1d/2d/3d layer"),
    ("gd-prune-before-scores", "`gd.prune()` before any scores were gathered",
     c_gd_no_scores, RuntimeError, "prune() needs Taylor scores, but none were gathered"),
    ("gd-prune-too-many", "`gd.prune(100)` beyond the minimum kept ratios", c_gd_too_many,
     ValueError, "cannot prune 100 filters"),
    ("gd-decay-no-attach", "`gd.prune()` with decay before `gd.attach(optimizer)`",
     c_gd_decay_no_attach, RuntimeError, "call gd.attach(optimizer) before gd.prune()"),
    ("gd-optimizer-too-early", "optimizer built before the gates existed",
     c_gd_optimizer_too_early, ValueError, "the optimizer does not hold the gates"),
    ("dg-step-before-attach", "decay pruner `step()` before `attach(optimizer)`",
     c_dg_step_before_attach, RuntimeError, "step() before attach(): call pruner.attach"),
    ("dg-foreign-optimizer", "decay pruner attached to an optimizer of another model",
     c_dg_foreign_optimizer, ValueError, "the optimizer holds none of the model's parameters"),
    ("dg-decay-dict", "decay pruner with `decay={'steps': 3}`", c_dg_decay_dict, TypeError,
     "decay must be a dpm_core.DecayConfig, got dict"),
    ("dg-untraceable", "decay pruner on example inputs the model cannot run",
     c_dg_untraceable, RuntimeError, "could not trace"),
    ("dg-prune-group", "`prune_group(DG, 'features.3')`: a name, not a Torch-Pruning group",
     c_dg_prune_group_not_a_group, TypeError, "expects a torch_pruning Group"),
    ("dg-ratio-over-one", "decay pruner with `pruning_ratio=1.5`", c_dg_ratio_over_one,
     ValueError, "pruning_ratio must be a number in [0, 1)"),
    ("dg-head-ratio-negative", "decay pruner with `head_pruning_ratio=-0.1`",
     c_dg_head_ratio_negative, ValueError, "head_pruning_ratio must be a number in [0, 1)"),
    ("dg-classifier-pruned", "decay pruner without the classifier in `ignored_layers` (a "
     "warning)", c_dg_classifier_pruned, UserWarning, "pruning would change the model's "
     "output size"),
    ("dg-gqa-sdpa", "decay pruner on grouped-query attention traced through sdpa "
     "(no `repeat_kv`)", c_dg_gqa_sdpa, ValueError, "Build the model with eager attention"),
    ("attach-scheduler", "`attach(lr_scheduler)`: a scheduler, not an optimizer",
     c_attach_scheduler, TypeError, "attach() expects a torch.optim.Optimizer (or a wrapper"),
    ("hf-plain-pruner", "`DecayPruningCallback(tp.pruner.MetaPruner(...))`",
     c_hf_plain_pruner, TypeError, "DecayPruningCallback expects a decay pruner"),
    ("hf-restore-no-state", "`callback.restore(folder)` on a folder without the pruner's "
     "state", c_hf_restore_not_a_checkpoint, FileNotFoundError,
     "give a checkpoint folder (output_dir/checkpoint-N) written by a Trainer that had this "
     "callback"),
    ("oto-decay-int", "`oto.dhspg(..., decay=5)`", c_oto_decay_int, TypeError,
     "decay must be None, a dpm_core.DecayConfig or a DecayEngine"),
    ("oto-target-sparsity", "`oto.dhspg(target_group_sparsity=1.5)`", c_oto_target,
     ValueError, "target_group_sparsity must be < 1.0"),
    ("oto-variant", "`oto.dhspg(variant='rmsprop')`", c_oto_variant, ValueError,
     "variant must be one of ['adam', 'adamw', 'sgd']"),
    ("oto-adaptive-pool-size", "`OTO(model, x)` where an `AdaptiveAvgPool2d((7, 7))` gets a "
     "4x4 map", c_oto_adaptive_pool_size, ValueError,
     "a dummy input of 14x14 (or any size at which the pooled map is a multiple of the "
     "output size) traces"),
    ("oto-subnet-optimizer-early", "`oto.subnet_optimizer(opt)` before `construct_subnet`",
     c_oto_subnet_optimizer_early, RuntimeError, "call construct_subnet(...) first"),
    ("oto-subnet-optimizer-foreign", "`oto.subnet_optimizer(opt)` for another model's "
     "optimizer", c_oto_subnet_optimizer_foreign, ValueError,
     "was not a parameter of the model when construct_subnet ran"),
    ("oto-tolerance-above-target",
     "`oto.dhspg(target_group_sparsity=0.3, tolerance_group_sparsity=0.5)`", c_oto_tolerance,
     ValueError, "tolerance_group_sparsity=0.5 is larger than target_group_sparsity=0.3"),
    ("oto-target-unreachable", "`oto.dhspg(target_group_sparsity=0.95)` on 2 layers of 8 groups",
     c_oto_unreachable, ValueError, "target_group_sparsity=0.95 cannot be reached"),
    ("oto-l1-decay-not-adamw", "`oto.dhspg(weight_decay_type='l1_norm')` with variant 'sgd'",
     c_oto_l1_sgd, ValueError, "weight_decay_type='l1_norm' (decoupled group-L1 decay) needs "
     "variant='adamw'"),
    ("oto-moment-init-sgd", "`oto.dhspg(moment_init='zero')` with variant 'sgd'",
     c_oto_moment_init_sgd, ValueError, "variant='sgd' has none"),
    ("oto-start-and-both-steps",
     "`oto.dhspg(start_pruning_step=3, partition_step=1, half_space_project_steps=2)`",
     c_oto_start_and_both_steps, ValueError,
     "start_pruning_step=3 only sets the defaults of partition_step and half_space_project_steps"),
    ("oto-cooldown-without-decay", "`oto.dhspg(release_cooldown=5)` with `decay=None`",
     c_oto_cooldown_no_decay, ValueError, "it needs decay=DecayConfig(...)"),
    ("oto-adam-dampening", "`oto.dhspg(variant='adam', dampening=0.1)`", c_oto_adam_dampening,
     ValueError, "dampening=0.1 is SGD's"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_clear_error(case):
    _id, _what, fn, exc, message = case
    with pytest.raises(exc) as info:
        fn()
    assert message in str(info.value), str(info.value)


def _readme_rows():
    text = README.read_text()
    m = re.search(r"<!-- bad-inputs -->(.*?)<!-- /bad-inputs -->", text, re.S)
    assert m, "README.md lacks the <!-- bad-inputs --> table"
    rows = []
    for line in m.group(1).strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.append(cells)
    return rows


def test_readme_table_matches_cases():
    rows = _readme_rows()
    expected = [[cid, what, exc.__name__, f"`{msg}`"] for cid, what, _fn, exc, msg in CASES]
    assert rows == expected, "README bad-inputs table is out of date; regenerate with " \
        "`python tests/test_bad_inputs.py`"


def render_table() -> str:
    lines = ["| case | bad input | error | message says |", "|---|---|---|---|"]
    for cid, what, _fn, exc, msg in CASES:
        lines.append(f"| {cid} | {what} | {exc.__name__} | `{msg}` |")
    return "\n".join(lines)


if __name__ == "__main__":  # rewrite the README table from CASES
    text = README.read_text()
    new = re.sub(r"<!-- bad-inputs -->.*?<!-- /bad-inputs -->",
                 "<!-- bad-inputs -->\n" + render_table() + "\n<!-- /bad-inputs -->", text,
                 flags=re.S)
    README.write_text(new)
    print(f"wrote {len(CASES)} rows")
