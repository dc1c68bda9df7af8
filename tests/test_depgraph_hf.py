"""Hugging Face glue: a real transformers.Trainer drives a decay pruner through
DecayPruningCallback, and accelerate's AcceleratedOptimizer is accepted by attach().

Tiny random-config LLaMA (2 layers, hidden 32), CPU, seconds. The attention modules are in
ignored_layers: these tests are about the Trainer / accelerate glue, so they prune the MLP
intermediate channels only."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
import torch_pruning as tp  # noqa: E402

from dpm_core import DecayConfig  # noqa: E402
from dpm_depgraph import DecayGroupNormPruner, DecayMetaPruner, DecayPrunerMixin  # noqa: E402
from dpm_depgraph.hf import DecayPruningCallback  # noqa: E402

VOCAB, SEQ, INTER = 64, 8, 64

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=INTER,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def _pruner(model, iterative_steps=2, steps=2, cls=DecayMetaPruner, **kw):
    if issubclass(cls, DecayPrunerMixin):
        kw["decay"] = DecayConfig(steps=steps, self_rectify=False)
    ignored = [model.lm_head] + [layer.self_attn for layer in model.model.layers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # RMSNorm weights are "unwrapped parameters"
        return cls(model, torch.randint(0, VOCAB, (1, SEQ)),
                   importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
                   iterative_steps=iterative_steps, ignored_layers=ignored,
                   output_transform=lambda out: out.logits, **kw)


def _data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def _args(tmp_path, max_steps):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, per_device_train_batch_size=4,
        max_steps=max_steps, learning_rate=1e-2, seed=0)


class Recorder(transformers.TrainerCallback):
    """After every optimizer step: the MLP width, a copy of one MLP weight, the learning
    rate in the optimizer, and whether the optimizer holds (and has AdamW state for) every
    parameter of the model as it is now."""

    def __init__(self, model):
        self.model = model
        self.rows = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        params = list(self.model.parameters())
        w = self.model.model.layers[0].mlp.gate_proj.weight
        st = optimizer.state.get(w, {})
        self.rows.append(dict(
            step=state.global_step, width=w.shape[0], weight=w.detach().clone(), param=w,
            lr=optimizer.param_groups[0]["lr"],
            all_held=all(id(p) in held for p in params),
            state_fits=all(optimizer.state[p]["exp_avg"].shape == p.shape
                           for p in params if p in optimizer.state),
            adam_step=float(st["step"]) if "step" in st else None))


def test_trainer_callback_prunes_and_the_trainers_optimizer_follows(tmp_path):
    model = _llama()
    pruner = _pruner(model)
    callback = DecayPruningCallback(pruner, prune_every=3)
    recorder = Recorder(model)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, 8),
                                   train_dataset=_data(), callbacks=[callback, recorder])
    result = trainer.train()

    # schedule: pruner.step() at the start (step 0) and after 3 optimizer steps; the first
    # quarter (16 of 64 channels) decays over steps 1-2 and is removed at step 3, the
    # second quarter decays over steps 4-5 and finalize() removes it when training ends
    assert callback.pruning_steps == [0, 3]
    assert isinstance(trainer.optimizer, accelerate.optimizer.AcceleratedOptimizer)
    assert pruner.optimizer is trainer.optimizer.optimizer
    widths = [r["width"] for r in recorder.rows]
    assert widths == [INTER] * 2 + [INTER - 16] * 6
    assert callback.finalized["still_decaying"] == 0
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.out_features == INTER // 2
        assert layer.mlp.up_proj.out_features == INTER // 2
        assert layer.mlp.down_proj.in_features == INTER // 2

    # after the mid-training removal the optimizer steps the NEW tensors, with AdamW's
    # state carried over (its step count continues instead of restarting at 1)
    assert all(r["all_held"] and r["state_fits"] for r in recorder.rows)
    after = [r for r in recorder.rows if r["step"] >= 3]
    assert all(r["param"] is after[0]["param"] for r in after)
    assert recorder.rows[1]["param"] is not after[0]["param"]
    for prev, cur in zip(after, after[1:]):
        assert not torch.equal(prev["weight"], cur["weight"])
    assert [r["adam_step"] for r in recorder.rows] == [float(s) for s in range(1, 9)]
    # the learning-rate scheduler keeps writing into the re-pointed param groups
    lrs = [r["lr"] for r in recorder.rows]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(lrs[-1])

    assert torch.isfinite(torch.tensor(result.training_loss))
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        out = model(ids).logits
    assert out.shape == (2, SEQ, VOCAB) and torch.isfinite(out).all()
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.parameters())


def test_accelerate_prepared_optimizer_attaches_and_follows_removals():
    model = _llama()
    pruner = _pruner(model, iterative_steps=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acc = accelerate.Accelerator(cpu=True)
    prepared_model, prepared_opt = acc.prepare(model, optimizer)
    assert isinstance(prepared_opt, accelerate.optimizer.AcceleratedOptimizer)
    pruner.attach(prepared_opt)
    assert pruner.optimizer is optimizer
    pruner.attach(prepared_opt)   # the same optimizer again: a no-op
    batch = torch.randint(0, VOCAB, (4, SEQ))

    def train_step():
        prepared_opt.zero_grad()
        acc.backward(prepared_model(input_ids=batch, labels=batch).loss)
        prepared_opt.step()

    pruner.step()
    for _ in range(2):
        train_step()
    assert pruner.engine.step_count == 2            # the decay ran in the wrapper's steps
    assert pruner.finalize()["still_decaying"] == 0
    w = model.model.layers[0].mlp.gate_proj.weight
    assert w.shape[0] == INTER // 2
    assert any(p is w for g in prepared_opt.param_groups for p in g["params"])
    before = w.detach().clone()
    train_step()
    assert not torch.equal(before, w.detach())
    assert prepared_opt.state[w]["exp_avg"].shape == w.shape


def test_regularize_runs_the_sparse_learning_penalty_before_every_optimizer_step(tmp_path):
    model = _llama()
    pruner = _pruner(model, cls=DecayGroupNormPruner, reg=1e-3)
    calls = []
    real = pruner.regularize

    def counting(m, *a, **kw):
        calls.append(pruner.engine.step_count)   # before the step it penalises
        return real(m, *a, **kw)
    pruner.regularize = counting
    callback = DecayPruningCallback(pruner, prune_every=2, regularize=True)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, 5), train_dataset=_data(),
                                   callbacks=[callback])
    trainer.train()
    assert calls == [0, 1, 2, 3, 4]
    assert callback.pruning_steps == [0, 2]
    assert model.model.layers[0].mlp.gate_proj.out_features == INTER // 2


def test_callback_rejects_bad_arguments():
    model = _llama()
    pruner = _pruner(model)
    with pytest.raises(TypeError, match="expects a decay pruner"):
        DecayPruningCallback(_pruner(model, cls=tp.pruner.MetaPruner))
    with pytest.raises(ValueError, match="prune_every must be an int >= 1"):
        DecayPruningCallback(pruner, prune_every=0)
    with pytest.raises(ValueError, match="start_step must be an int >= 0"):
        DecayPruningCallback(pruner, start_step=-1)

    state = transformers.TrainerState(max_steps=100)
    control = transformers.TrainerControl()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = transformers.TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    callback = DecayPruningCallback(pruner, prune_every=3)
    with pytest.raises(ValueError, match="built on another model"):
        callback.on_train_begin(args, state, control, model=_llama(seed=1), optimizer=optimizer)

    class TwoProcesses:
        world_size = 2
    with pytest.raises(NotImplementedError, match="single-process training only"):
        callback.on_train_begin(TwoProcesses(), state, control, model=model, optimizer=optimizer)
    assert pruner.optimizer is None and pruner.current_step == 0   # nothing happened

    short = transformers.TrainerState(max_steps=4)
    with pytest.warns(UserWarning, match="training stops at 4"):
        callback.on_train_begin(args, short, control, model=model, optimizer=optimizer)
    assert pruner.optimizer is optimizer and callback.pruning_steps == [0]


def _saving_args(tmp_path, max_steps):
    args = _args(tmp_path, max_steps)
    args.save_strategy = transformers.IntervalStrategy.STEPS
    args.save_steps = 4
    return args


def test_trainer_checkpoint_of_a_pruned_model_resumes_exactly(tmp_path):
    """A Trainer checkpoint taken after a physical removal resumes into a freshly built
    model: restore() replays the removals, then the Trainer loads weights and optimizer."""
    def run(out, resume=None):
        model = _llama()
        pruner = _pruner(model)
        callback = DecayPruningCallback(pruner, prune_every=3)
        trainer = transformers.Trainer(model=model, args=_saving_args(out, 8),
                                       train_dataset=_data(), callbacks=[callback])
        if resume is not None:
            callback.restore(resume)
            assert model.model.layers[0].mlp.gate_proj.out_features == INTER - 16
        trainer.train(resume_from_checkpoint=resume)
        return model, callback

    full, cb_full = run(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-4"   # after the removal at step 3, mid-decay
    assert (ckpt / "dpm_pruner.pt").is_file()
    resumed, cb_resumed = run(tmp_path / "resumed", resume=str(ckpt))
    assert cb_resumed.pruning_steps == cb_full.pruning_steps == [0, 3]
    assert cb_resumed.finalized == cb_full.finalized
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert resumed.config.intermediate_size == full.config.intermediate_size == INTER // 2


def test_restore_says_what_is_wrong(tmp_path):
    model = _llama()
    pruner = _pruner(model)
    callback = DecayPruningCallback(pruner, prune_every=3)
    with pytest.raises(FileNotFoundError, match="checkpoint-N"):
        callback.restore(tmp_path)
    (tmp_path / "dpm_pruner.pt").write_bytes(b"")
    pruner.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="freshly built"):
        callback.restore(tmp_path)
