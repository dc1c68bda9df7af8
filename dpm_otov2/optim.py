"""DHSPG: OTOv2's Dual Half-Space Projected Gradient, with optional Decay Pruning.

Written from the OTOv2 paper (Chen et al., "OTOv2: Automatic, Generic, User-Friendly",
ICLR 2023, Algorithm 2) and the rules of only-train-once 2.x's
``only_train_once/optimizer/dhspg.py`` (identical to the 2.0.16 release), on
only-train-once 3.0.1's param groups. With ``decay=None`` it follows that DHSPG step for
step (tested against a float64 re-statement of its rules, ``tests/test_otov2_dhspg_upstream.py``).
Per step, with ``n`` = the number of steps *including* this one:

1. *Direction.* ``d = grad`` (+ ``weight_decay * x`` unless ``adamw``), then SGD
   momentum (buffer starts at ``d``, then ``m * buf + (1 - dampening) * d``) or Adam:
   with ``moment_init="gradient"`` (default, OTOv2) the buffers start at ``g`` and ``g^2``
   (no ``1 - beta`` factor), then ``beta * buf + (1 - beta) * g``, bias-corrected by
   ``1 - beta ** n``; ``moment_init="zero"`` is ``torch.optim.Adam``. ``d = m_hat /
   (sqrt(v_hat) + 1e-8)``. Every parameter takes the trial step ``x_hat = x - lr * d``
   (``adamw`` also ``- lr * weight_decay * x``; with ``weight_decay_type="l1_norm"`` the
   ZIG rows take ``- lr * weight_decay * x / (||x|| + 1e-8)`` instead).
2. *Partition* (once, at the step with ``n - 1 == partition_step``). Every zero-invariant
   group (ZIG, see :mod:`dpm_otov2.zig`) gets a redundancy score
   (:func:`~dpm_otov2.dhspg_rules.redundancy_scores`); the
   ``K = int(total * min(target + tolerance, 0.999))`` highest scores are redundant. Per
   OTO group (layer) the number of kept ZIGs (G_np) is rounded to a multiple of
   ``group_divisible``, **at least one multiple**, so no layer is ever removed entirely
   (:func:`~dpm_otov2.dhspg_rules.num_kept`); the layer's least redundant ZIGs are kept, the
   rest form G_p, the magnitude-penalised groups. Layers with ``num_groups <=
   group_divisible`` are never penalised. (The rounding can leave G_p short of the target;
   a ``RuntimeWarning`` says so.)
3. *Penalty* (G_p, while zero ZIGs < target, checked on the state after the previous step).
   ``x_hat -= lr * lambda_g * x / (||x|| + 1e-8)`` with ``lambda_g = lmbda`` while
   ``n < warm_up_steps``, afterwards the adaptive lambda for ZIGs whose direction pushes
   them outwards (:func:`~dpm_otov2.dhspg_rules.adaptive_lambdas`).
4. *Half-space projection* (G_p, when ``n >= half_space_project_steps`` and
   ``n >= warm_up_steps``): a ZIG whose trial point left the half-space,
   ``<x_hat, x> < epsilon * ||x||^2``, is set to exactly 0 in one step. Zero ZIGs stay 0
   when ``fixed_zero_groups`` or ``n > half_space_project_steps``.

``decay=DecayConfig(...)`` replaces the single-step projection of 4. by the Decay Pruning
Method (paper section 4.1): a ZIG the projection would zero instead takes its penalty-free
trial step and is marked in a :class:`dpm_core.DecayEngine` (right after this step, so
``L_init`` is its norm then); over the next N steps the engine scales it to
``(N - n) / N * L_init`` (Smooth Pruning) and it ends exactly 0 (then stays 0 and
``construct_subnet`` removes it). Decaying ZIGs are *excluded from the group-sparsity
penalty* when their update is computed (we do not use ``engine.capture_clean_grads()``:
DHSPG never writes its penalty into ``.grad``, it adds it to the trial point, so leaving it
out for decaying ZIGs makes both their update and the engine's Self-Rectifying criteria
C_rate / C_len penalty-free, as section 3.2 "Special Situations" asks). Released ZIGs leave
G_p and train normally; G_p is topped up to K at the next step from G_np (best redundancy
scores, with the same keep-per-layer rule), skipping ZIGs released less than
``release_cooldown`` steps ago, and again every ``release_cooldown`` steps while it is
short and the target is not reached, so a released ZIG may be classified redundant again
later. Decaying ZIGs count towards the target. These are the only places where the DPM
path differs from OTOv2's rules.

Deliberate differences to the 2.x package (also in docs/otov2.md, with reasons): no
per-group ``upper_group_sparsity`` cap (1.0 = no cap in every shipped config);
deterministic tie-breaking (no ``randperm``); any device; the target counts zero groups
exactly (``zero >= ceil(total * target)``; 2.x pads its denominator by 1e-6 per group
type); a lone ``partition_step`` or ``half_space_project_steps`` is honoured (2.x ignores
it unless both are given); bad or inconsistent settings raise instead of being accepted.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.optim.optimizer import Optimizer

from .dhspg_rules import SAFE as _SAFE
from .dhspg_rules import adaptive_lambdas, num_kept, redundancy_scores
from .zig import Zig, build_zigs

__all__ = ["DHSPG", "DEFAULT_OPT_PARAMS", "dhspg"]

#: Defaults per variant (the values only-train-once ships for DHSPG).
DEFAULT_OPT_PARAMS = {
    "sgd": dict(first_momentum=0.0, second_momentum=0.0, dampening=0.0, weight_decay=0.0,
                lmbda=1e-3, lmbda_amplify=2.0, hat_lmbda_coeff=10.0),
    "adam": dict(first_momentum=0.9, second_momentum=0.999, dampening=0.0, weight_decay=0.0,
                 lmbda=1e-2, lmbda_amplify=20.0, hat_lmbda_coeff=1e3),
    "adamw": dict(first_momentum=0.9, second_momentum=0.999, dampening=0.0, weight_decay=1e-2,
                  lmbda=1e-2, lmbda_amplify=20.0, hat_lmbda_coeff=1e3),
}

#: OTOv2's default ``tolerance_group_sparsity`` (2.0.x DHSPG and ``OTO.dhspg``).
DEFAULT_TOLERANCE = 0.05

_STATE_VERSION = 2  # 2: weight_decay_type, moment_init (OTOv2's Adam buffers)


def _check_num(name, value, lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not isinstance(value, int)) or not math.isfinite(value):
        kind = "an int" if integer else "a finite number"
        raise ValueError(f"DHSPG: {name} must be {kind}, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"DHSPG: {name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"DHSPG: {name} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return value


def attach_engine(optimizer, decay, owner: str):
    """The decay engine for an OTO optimizer: one engine group per ZIG group of
    ``optimizer.zigs``, attached to the optimizer, releases reported to
    ``optimizer._on_released``. ``decay`` is a DecayConfig or a ready DecayEngine."""
    from dpm_core import DecayConfig, DecayEngine

    if isinstance(decay, DecayConfig):
        engine = DecayEngine(decay)
    elif isinstance(decay, DecayEngine):
        engine = decay
    else:
        raise TypeError(f"{owner}: decay must be None, a dpm_core.DecayConfig or a "
                        f"DecayEngine, got {type(decay).__name__}")
    for z in optimizer.zigs:
        engine.add_group(z.name, z.engine_slices())
    handle = engine.attach(optimizer)
    engine.on_released(optimizer._on_released)
    return engine, handle


class DHSPG(Optimizer):
    """Dual Half-Space Projected Gradient on OTO param groups (see the module docstring).

    Args:
        params: ``oto._graph.get_param_groups()`` (all of them: non-prunable groups train
            as with the base optimizer; auxiliary groups are handled with their stems).
        variant: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        first_momentum / momentum: SGD momentum or Adam beta1 (``momentum`` is an alias).
        second_momentum: Adam beta2.
        dampening: SGD dampening.
        weight_decay: L2 (coupled for sgd/adam, decoupled for adamw).
        weight_decay_type: ``"l2_norm"`` or (``adamw`` only) ``"l1_norm"``: decoupled
            group-L1 decay ``lr * weight_decay * x / ||x||`` on ZIG rows (OTOv2's option).
        moment_init: Adam only. ``"gradient"`` (default, OTOv2): the moment buffers start
            at g and g^2 and are bias-corrected by the optimizer's step count; ``"zero"``:
            ``torch.optim.Adam``.
        lmbda, lmbda_amplify, hat_lmbda_coeff: group-sparsity penalty and its adaptation.
        epsilon: half-space projection threshold in [0, 1).
        target_group_sparsity: fraction of ZIGs to zero, in [0, 1). Must be reachable with
            every layer keeping ``group_divisible`` ZIGs (else ``ValueError``).
        tolerance_group_sparsity: extra fraction in G_p (default 0.05, OTOv2's); not larger
            than the target.
        start_pruning_step: default for ``partition_step`` and ``half_space_project_steps``.
            (``start_pruning_steps``, the 2.0.x name, is accepted too.)
        partition_step: the partition happens at the step after ``partition_step`` steps.
        half_space_project_steps: the projection acts from the ``half_space_project_steps``-th
            step on (counting from 1, as OTOv2; with ``partition_step`` = this value both
            start at the same step).
        warm_up_steps: the first ``warm_up_steps - 1`` steps use a fixed lambda and no
            projection (OTOv2's count).
        group_divisible: kept ZIGs per OTO group are a multiple of this.
        fixed_zero_groups: keep zero ZIGs at exactly 0.
        decay: ``None`` (single-step projection, the original) or a
            :class:`dpm_core.DecayConfig` / :class:`dpm_core.DecayEngine` (Decay Pruning).
        release_cooldown: steps a released ZIG stays out of G_p (default ``4 * N``).
    """

    def __init__(self, params, variant: str = "sgd", lr: float = 0.1, first_momentum=None,
                 second_momentum=None, dampening=None, weight_decay=None, lmbda=None,
                 lmbda_amplify=None, hat_lmbda_coeff=None, epsilon: float = 0.0,
                 target_group_sparsity: float = 0.5, tolerance_group_sparsity=None,
                 start_pruning_step=None, partition_step=None,
                 half_space_project_steps=None, warm_up_steps: int = 0,
                 group_divisible: int = 1, fixed_zero_groups: bool = True, decay=None,
                 release_cooldown=None, momentum=None, start_pruning_steps=None,
                 weight_decay_type: str = "l2_norm", moment_init=None):
        if variant not in DEFAULT_OPT_PARAMS:
            raise ValueError(f"DHSPG: variant must be one of {sorted(DEFAULT_OPT_PARAMS)}, "
                             f"got {variant!r}")
        if momentum is not None:
            if first_momentum is not None and first_momentum != momentum:
                raise ValueError("DHSPG: give either momentum or first_momentum, not both")
            first_momentum = momentum
        if start_pruning_steps is not None:
            if start_pruning_step is not None and start_pruning_step != start_pruning_steps:
                raise ValueError("DHSPG: give either start_pruning_step or its 2.0.x spelling "
                                 "start_pruning_steps, not both")
            start_pruning_step = start_pruning_steps
        if start_pruning_step is None:
            start_pruning_step = 0
        elif partition_step is not None and half_space_project_steps is not None:
            raise ValueError(
                f"DHSPG: start_pruning_step={start_pruning_step!r} only sets the defaults of "
                f"partition_step and half_space_project_steps, and both are given "
                f"({partition_step!r}, {half_space_project_steps!r}); drop one of them")
        if release_cooldown is not None and decay is None:
            raise ValueError("DHSPG: release_cooldown is the Decay Pruning Method's (steps a "
                             "released group stays out of G_p); it needs decay=DecayConfig(...)")
        if variant == "sgd" and second_momentum:
            raise ValueError(f"DHSPG: second_momentum={second_momentum!r} is Adam's beta2; "
                             f"variant='sgd' has no second moment (use variant='adam')")
        if variant != "sgd" and dampening:
            raise ValueError(f"DHSPG: dampening={dampening!r} is SGD's; variant={variant!r} "
                             f"averages its moments with beta1 / beta2 (first_momentum / "
                             f"second_momentum)")
        d = DEFAULT_OPT_PARAMS[variant]
        pick = lambda v, k: d[k] if v is None else v  # noqa: E731
        first_momentum = pick(first_momentum, "first_momentum")
        second_momentum = pick(second_momentum, "second_momentum")
        dampening = pick(dampening, "dampening")
        weight_decay = pick(weight_decay, "weight_decay")
        lmbda = pick(lmbda, "lmbda")
        lmbda_amplify = pick(lmbda_amplify, "lmbda_amplify")
        hat_lmbda_coeff = pick(hat_lmbda_coeff, "hat_lmbda_coeff")
        _check_num("lr", lr, lo=0.0)
        _check_num("first_momentum", first_momentum, lo=0.0, hi=1.0, hi_open=True)
        _check_num("second_momentum", second_momentum, lo=0.0, hi=1.0, hi_open=True)
        _check_num("dampening", dampening, lo=0.0, hi=1.0)
        _check_num("weight_decay", weight_decay, lo=0.0)
        _check_num("lmbda", lmbda, lo=0.0)
        _check_num("lmbda_amplify", lmbda_amplify, lo=0.0)
        _check_num("hat_lmbda_coeff", hat_lmbda_coeff, lo=1.0)
        _check_num("epsilon", epsilon, lo=0.0, hi=1.0, hi_open=True)
        _check_num("target_group_sparsity", target_group_sparsity, lo=0.0, hi=1.0, hi_open=True)
        if tolerance_group_sparsity is None:
            tolerance_group_sparsity = DEFAULT_TOLERANCE
        else:
            _check_num("tolerance_group_sparsity", tolerance_group_sparsity, lo=0.0, hi=1.0)
            if tolerance_group_sparsity > target_group_sparsity > 0:
                raise ValueError(
                    f"DHSPG: tolerance_group_sparsity={tolerance_group_sparsity!r} is larger "
                    f"than target_group_sparsity={target_group_sparsity!r}; the tolerance is "
                    f"the extra fraction of groups penalised beyond the target (OTOv2 uses "
                    f"{DEFAULT_TOLERANCE}), so the run would zero up to "
                    f"{target_group_sparsity + tolerance_group_sparsity:.3g} of the groups. "
                    f"Pass a tolerance <= the target")
        if weight_decay_type not in ("l2_norm", "l1_norm"):
            raise ValueError(f"DHSPG: weight_decay_type must be 'l2_norm' or 'l1_norm', got "
                             f"{weight_decay_type!r}")
        if weight_decay_type == "l1_norm" and variant != "adamw":
            raise ValueError(f"DHSPG: weight_decay_type='l1_norm' (decoupled group-L1 decay) "
                             f"needs variant='adamw'; variant={variant!r} adds weight_decay * x "
                             f"to the gradient (OTOv2 ignores the type there)")
        if moment_init is None:
            moment_init = "gradient"
        elif variant == "sgd":
            raise ValueError(f"DHSPG: moment_init={moment_init!r} sets Adam's moment buffers; "
                             f"variant='sgd' has none (use variant='adam' or 'adamw')")
        if moment_init not in ("gradient", "zero"):
            raise ValueError(f"DHSPG: moment_init must be 'gradient' (OTOv2: buffers start at "
                             f"g and g^2) or 'zero' (torch.optim.Adam), got {moment_init!r}")
        _check_num("start_pruning_step", start_pruning_step, lo=0, integer=True)
        partition_step = start_pruning_step if partition_step is None else partition_step
        half_space_project_steps = (start_pruning_step if half_space_project_steps is None
                                    else half_space_project_steps)
        _check_num("partition_step", partition_step, lo=0, integer=True)
        _check_num("half_space_project_steps", half_space_project_steps, lo=0, integer=True)
        _check_num("warm_up_steps", warm_up_steps, lo=0, integer=True)
        _check_num("group_divisible", group_divisible, lo=1, integer=True)
        if not isinstance(fixed_zero_groups, bool):
            raise ValueError(f"DHSPG: fixed_zero_groups must be True or False, "
                             f"got {fixed_zero_groups!r}")

        groups = self._check_param_groups(params)
        defaults = dict(lr=lr, variant=variant, first_momentum=first_momentum,
                        second_momentum=second_momentum, dampening=dampening,
                        weight_decay=weight_decay, lmbda=lmbda, lmbda_amplify=lmbda_amplify,
                        hat_lmbda_coeff=hat_lmbda_coeff, epsilon=epsilon,
                        weight_decay_type=weight_decay_type, moment_init=moment_init)
        super().__init__(groups, defaults)

        self.target_group_sparsity = float(target_group_sparsity)
        self.tolerance_group_sparsity = float(tolerance_group_sparsity)
        self.partition_step = partition_step
        self.half_space_project_steps = half_space_project_steps
        self.warm_up_steps = warm_up_steps
        self.group_divisible = group_divisible
        self.fixed_zero_groups = fixed_zero_groups

        self.zigs: list[Zig] = build_zigs(self.param_groups)
        self.total_num_groups = sum(z.m for z in self.zigs)
        if self.total_num_groups == 0:
            warnings.warn("DHSPG: no prunable zero-invariant group among the param groups; "
                          "it will train like the base optimizer", RuntimeWarning)
        self.target_num_zero_groups = math.ceil(self.total_num_groups
                                                * self.target_group_sparsity - 1e-9)
        self.K = int(self.total_num_groups * min(target_group_sparsity
                                                 + tolerance_group_sparsity, 0.999))
        self._check_reachable()
        self.num_steps = 0
        self.partitioned = False
        self._gp = {z.name: torch.zeros(z.m, dtype=torch.bool, device=z.params()[0].device)
                    for z in self.zigs}
        self._released_at = {z.name: torch.full((z.m,), -(2 ** 62), dtype=torch.int64,
                                                device=z.params()[0].device)
                             for z in self.zigs}
        self._needs_refill = False
        self._next_refill = 0
        self._pending_marks: dict[str, torch.Tensor] = {}
        self.curr_group_sparsity = 0.0
        self.curr_num_zero_groups = 0
        self.num_released = 0
        self._zero = {z.name: torch.zeros(z.m, dtype=torch.bool) for z in self.zigs}
        self._nzero = {z.name: 0 for z in self.zigs}
        self._gp_count = {z.name: 0 for z in self.zigs}
        self._num_decaying = 0
        self._seen_zeroed = 0

        if release_cooldown is not None:
            _check_num("release_cooldown", release_cooldown, lo=0, integer=True)
        self.engine = None
        self._engine_handle = None
        if decay is not None:
            self._setup_engine(decay)
        if release_cooldown is None:
            release_cooldown = 4 * self.engine.config.steps if self.engine is not None else 0
        self.release_cooldown = release_cooldown
        self._own_hook = self.register_step_post_hook(DHSPG._after_step)
        self._refresh_sparsity()

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _check_param_groups(params) -> list[dict]:
        if isinstance(params, torch.Tensor):
            raise TypeError("DHSPG expects OTO param groups (oto._graph.get_param_groups()), "
                            "got a single tensor")
        try:
            groups = list(params)
        except TypeError:
            raise TypeError(f"DHSPG expects OTO param groups (oto._graph.get_param_groups()), "
                            f"got {type(params).__name__}") from None
        if not groups:
            raise ValueError("DHSPG got an empty list of param groups")
        need = ("id", "num_groups", "params", "p_transform", "is_prunable", "is_auxiliary")
        out = []
        for i, g in enumerate(groups):
            if not isinstance(g, dict) or any(k not in g for k in need):
                raise TypeError(f"DHSPG expects OTO param groups, but item {i} is a "
                                f"{type(g).__name__} without the keys {need}; pass "
                                f"oto._graph.get_param_groups() or use dpm_otov2.dhspg(oto, ...)")
            g = dict(g)
            g["params"] = list(g["params"])
            out.append(g)
        return out

    def _setup_engine(self, decay) -> None:
        self.engine, self._engine_handle = attach_engine(self, decay, "DHSPG")

    # ------------------------------------------------------------------ helpers
    def _grad_estimate(self, group: dict, p: torch.Tensor) -> torch.Tensor:
        grad = p.grad.detach()
        if grad.is_sparse:
            raise RuntimeError("DHSPG does not support sparse gradients")
        variant = group["variant"]
        wd = group["weight_decay"]
        if wd and variant != "adamw":
            grad = grad.add(p.detach(), alpha=wd)
        state = self.state[p]
        if variant == "sgd":
            mom = group["first_momentum"]
            if mom > 0:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = grad.clone()
                else:
                    buf.mul_(mom).add_(grad, alpha=1.0 - group["dampening"])
                return buf
            return grad
        b1, b2 = group["first_momentum"], group["second_momentum"]
        state["step"] = state.get("step", 0) + 1
        if "exp_avg" in state:
            state["exp_avg"].mul_(b1).add_(grad, alpha=1.0 - b1)
            state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
        elif group["moment_init"] == "gradient":
            # OTOv2: the buffers start at g and g^2 (no 1 - beta factor) ...
            state["exp_avg"] = grad.clone(memory_format=torch.preserve_format)
            state["exp_avg_sq"] = grad * grad
        else:  # "zero": torch.optim.Adam
            state["exp_avg"] = grad.mul(1.0 - b1)
            state["exp_avg_sq"] = grad * grad * (1.0 - b2)
        # ... and are bias-corrected by the optimizer's step count (OTOv2) or by the
        # parameter's own count of updates (torch.optim.Adam)
        t = self.num_steps if group["moment_init"] == "gradient" else state["step"]
        c1 = 1.0 - b1 ** t
        c2 = 1.0 - b2 ** t
        return (state["exp_avg"] / c1) / ((state["exp_avg_sq"] / c2).sqrt().add_(_SAFE))

    def _zig_decaying(self, z: Zig):
        """Bool mask of decaying ZIGs (engine), or None without decay."""
        if self.engine is None:
            return None
        return self.engine.is_decaying(z.name)

    def _effective_zero_count(self) -> int:
        return self.curr_num_zero_groups + self._num_decaying

    def _check_reachable(self) -> None:
        """Raise if the target needs more zero ZIGs than G_p can ever hold: every layer
        keeps at least ``group_divisible`` ZIGs (all of them when it has no more), and G_p
        holds at most K = int(total * min(target + tolerance, 0.999)) ZIGs."""
        need = self.target_num_zero_groups
        if need <= 0:
            return
        dvs = self.group_divisible
        most = min(sum(z.m - dvs for z in self.zigs if z.m > dvs), self.K)
        if need > most:
            n = self.total_num_groups
            raise ValueError(
                f"DHSPG: target_group_sparsity={self.target_group_sparsity!r} cannot be "
                f"reached: it needs {need} of the {n} zero-invariant groups zeroed, but every "
                f"layer keeps at least group_divisible={dvs} of its groups (so that no layer "
                f"is removed entirely) and the penalised set holds at most K={self.K}, so at "
                f"most {most} ({most / n:.3f}) can become zero. Lower the target to <= "
                f"{most / n:.3f} or lower group_divisible")

    def reach_target_group_sparsity(self) -> bool:
        """True once zero (plus, with decay, decaying) ZIGs reach the target."""
        if self.target_num_zero_groups <= 0:
            return True
        return self._effective_zero_count() >= self.target_num_zero_groups

    # ------------------------------------------------------------------ partition
    def _scores(self, grads: dict) -> list[torch.Tensor]:
        return redundancy_scores([z.param_rows() for z in self.zigs],
                                 [grads[z.name] for z in self.zigs])

    def _partition(self, grads: dict) -> None:
        """Choose G_p (see module docstring); keeps zero/decaying ZIGs in G_p."""
        if not self.zigs:
            self.partitioned = True
            return
        scores = self._scores(grads)
        forced_in, forced_out = [], []
        for z, s in zip(self.zigs, scores):
            x_norm = z.param_rows().float().norm(dim=1)
            fin = (x_norm == 0) | self._gp[z.name] if self.partitioned else (x_norm == 0)
            dec = self._zig_decaying(z)
            if dec is not None:
                fin = fin | dec
            fout = (self.num_steps - self._released_at[z.name]) < self.release_cooldown
            fout = fout & ~fin
            forced_in.append(fin)
            forced_out.append(fout)
        big = torch.finfo(torch.float32).max
        eff = [torch.where(fi, torch.full_like(s, big),
                           torch.where(fo, torch.full_like(s, -big), s))
               for s, fi, fo in zip(scores, forced_in, forced_out)]
        allscores = torch.cat([e.to(eff[0].device) for e in eff])
        k = min(self.K, allscores.numel())
        # deterministic top-k: stable sort, descending score, ties by position
        order = torch.sort(allscores, descending=True, stable=True).indices[:k]
        chosen = torch.zeros(allscores.numel(), dtype=torch.bool, device=allscores.device)
        chosen[order] = True
        chosen &= allscores > -big
        start = 0
        for z, e, fin in zip(self.zigs, eff, forced_in):
            sel = chosen[start:start + z.m].to(e.device)
            start += z.m
            # OTOv2's per-layer rule: the kept (not penalised) ZIGs are rounded to a multiple
            # of group_divisible, at least one multiple, so that no layer is ever removed
            # entirely; they are the layer's least redundant ZIGs (zero / decaying ZIGs last)
            keep = num_kept(z.m, z.m - int(sel.sum()), self.group_divisible)
            kept = torch.sort(e, descending=False, stable=True).indices[:keep]
            sel = torch.ones(z.m, dtype=torch.bool, device=e.device)
            sel[kept] = False
            sel |= fin
            self._gp[z.name] = sel
            self._gp_count[z.name] = int(sel.sum())
        self.partitioned = True
        self._needs_refill = False
        self._next_refill = self.num_steps + max(1, self.release_cooldown)
        if self.engine is None:
            reachable = self.curr_num_zero_groups + sum(
                int((self._gp[z.name] & ~self._zero[z.name]).sum()) for z in self.zigs)
            if reachable < self.target_num_zero_groups:
                warnings.warn(
                    f"DHSPG: after rounding to group_divisible={self.group_divisible} per "
                    f"layer, only {reachable} of the {self.total_num_groups} groups can become "
                    f"zero, fewer than the target's {self.target_num_zero_groups}; the target "
                    f"group sparsity will not be reached (raise tolerance_group_sparsity or "
                    f"lower group_divisible)", RuntimeWarning)

    def _refill_due(self) -> bool:
        """Top up G_p after releases: at once, then every ``release_cooldown`` steps while
        G_p (which includes the zero and decaying ZIGs) is short of K and the target is not
        reached, so ZIGs whose cooldown ended can be classified redundant again."""
        if not self.partitioned or self.engine is None:
            return False
        if not (self._needs_refill or self.num_steps >= self._next_refill):
            return False
        if sum(self._gp_count.values()) >= self.K or self.reach_target_group_sparsity():
            return False
        return True

    def _on_released(self, name: str, channels: torch.Tensor) -> None:
        self._gp[name][channels] = False
        self._gp_count[name] = int(self._gp[name].sum())
        self._released_at[name][channels] = self.num_steps
        self.num_released += int(channels.numel())
        self._needs_refill = True

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.num_steps += 1
        n = self.num_steps  # steps including this one (OTOv2 tests its step settings on n)

        # 1. gradient estimates (+ partition / refill of G_p, on pre-step weights)
        est: dict[int, torch.Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    est[id(p)] = self._grad_estimate(group, p)
        if self.zigs and ((not self.partitioned and n - 1 >= self.partition_step)
                          or self._refill_due()):
            self._partition({z.name: z.rows([est.get(id(p)) for p in z.params()])
                             for z in self.zigs})
        penalise = self.partitioned and not self.reach_target_group_sparsity()
        project = penalise and n >= self.half_space_project_steps and n >= self.warm_up_steps
        adaptive = n >= self.warm_up_steps
        fix_zero = self.fixed_zero_groups or n > self.half_space_project_steps
        active = [z for z in self.zigs
                  if (penalise and self._gp_count[z.name] > 0) or self._nzero[z.name] > 0
                  or self._l1_decay(self.param_groups[z.group_index])]
        x_rows = {z.name: z.param_rows() for z in active}

        # 2. trial step x_hat = x - lr * d for every parameter
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                e = est.get(id(p))
                if e is None:
                    continue
                if wd and group["variant"] == "adamw":
                    p.mul_(1.0 - lr * wd)
                p.add_(e, alpha=-lr)

        # 3. ZIGs: group-L1 decay, penalty on G_p, half-space projection (or decay marks),
        #    fixed zeros
        for z in active:
            group = self.param_groups[z.group_index]
            x = x_rows[z.name]
            x_norm = x.norm(dim=1)
            zero = x_norm == 0
            hat = z.param_rows()
            if self._l1_decay(group):
                # weight_decay_type='l1_norm': on ZIG rows the decoupled decay is
                # lr * wd * x / ||x|| instead of the trial step's lr * wd * x
                lr_wd = group["lr"] * group["weight_decay"]
                hat += lr_wd * (x - x / (x_norm + _SAFE).unsqueeze(1))
            pen = None
            if penalise and self._gp_count[z.name] > 0:
                pen = self._gp[z.name] & ~zero
                dec = self._zig_decaying(z)
                if dec is not None:
                    pen &= ~dec  # decaying ZIGs: penalty-free update (SR criteria too)
            if pen is not None:
                d = z.rows([est.get(id(p)) for p in z.params()])
                lam = (adaptive_lambdas(x, d, x_norm, pen, group["lmbda"],
                                        group["lmbda_amplify"], group["hat_lmbda_coeff"])
                       if adaptive else torch.full_like(x_norm, group["lmbda"]))
                penalised = hat - (group["lr"] * lam).unsqueeze(1) * (
                    x / (x_norm + _SAFE).unsqueeze(1))
                use = pen
                if project:
                    inner = (penalised * x).sum(dim=1)
                    proj = pen & (inner < group["epsilon"] * x_norm * x_norm)
                    if self.engine is None:
                        penalised[proj] = 0.0  # the single-step half-space projection
                    else:
                        use = pen & ~proj  # projected ZIGs keep their penalty-free step
                        prev = self._pending_marks.get(z.name)
                        self._pending_marks[z.name] = proj if prev is None else prev | proj
                hat = torch.where(use.unsqueeze(1), penalised, hat)
            if fix_zero:
                hat[zero] = 0.0
            z.write(hat)
            self._set_zero(z, hat.norm(dim=1) == 0)
        return loss

    @staticmethod
    def _l1_decay(group: dict) -> bool:
        return (group["weight_decay_type"] == "l1_norm" and group["variant"] == "adamw"
                and group["weight_decay"] > 0)

    @torch.no_grad()
    def _after_step(self, args, kwargs) -> None:
        # runs after the engine's own post-hook (registered later), so marks made here
        # take effect from the next step with L_init = the norm after this step
        eng = self.engine
        if eng is None:
            return
        marked = False
        for name, mask in self._pending_marks.items():
            if bool(mask.any()):
                eng.mark(name, mask)
                marked = True
        self._pending_marks = {}
        if eng.counters["zeroed"] != self._seen_zeroed:
            self._seen_zeroed = eng.counters["zeroed"]
            for z in self.zigs:
                self._set_zero(z, self._zero[z.name] | eng.state(z.name).zeroed)
        if marked or self._num_decaying:
            self._num_decaying = sum(int(eng.is_decaying(z.name).sum()) for z in self.zigs)

    def _set_zero(self, z: Zig, mask: torch.Tensor) -> None:
        n_old = self._nzero[z.name]
        n = int(mask.sum())
        self._zero[z.name] = mask
        self._nzero[z.name] = n
        self.curr_num_zero_groups += n - n_old
        self.curr_group_sparsity = (self.curr_num_zero_groups / self.total_num_groups
                                    if self.total_num_groups else 0.0)

    def _refresh_sparsity(self) -> None:
        """Recompute the zero masks (and decaying count) from the weights."""
        self.curr_num_zero_groups = 0
        for z in self.zigs:
            self._nzero[z.name] = 0
            self._set_zero(z, z.param_rows().norm(dim=1) == 0)
        if self.engine is not None:
            self._seen_zeroed = self.engine.counters["zeroed"]
            self._num_decaying = sum(int(self.engine.is_decaying(z.name).sum())
                                     for z in self.zigs)

    # ------------------------------------------------------------------ reporting
    def compute_group_sparsity(self) -> float:
        """Fraction of ZIGs that are exactly zero now."""
        self._refresh_sparsity()
        return self.curr_group_sparsity

    def compute_group_sparsity_param_norm(self):
        """(group sparsity, sum of ZIG norms, number of zero ZIGs), like OTO's optimizers."""
        total_norm = 0.0
        for z in self.zigs:
            total_norm += float(z.param_rows().float().norm(dim=1).sum())
        self._refresh_sparsity()
        return self.curr_group_sparsity, total_norm, self.curr_num_zero_groups

    def group_masks(self) -> dict:
        """Per OTO group id: ``{"penalised", "zero", "decaying"}`` bool masks (copies)."""
        out = {}
        for z in self.zigs:
            dec = self._zig_decaying(z)
            out[z.name] = {
                "penalised": self._gp[z.name].clone(),
                "zero": z.param_rows().norm(dim=1) == 0,
                "decaying": dec.clone() if dec is not None else
                torch.zeros(z.m, dtype=torch.bool),
            }
        return out

    def set_learning_rate(self, lr: float) -> None:
        _check_num("lr", lr, lo=0.0)
        for g in self.param_groups:
            g["lr"] = lr

    def get_learning_rate(self) -> float:
        return self.param_groups[-1]["lr"]

    def _set_all(self, key, value, **chk):
        _check_num(key, value, **chk)
        for g in self.param_groups:
            g[key] = value

    def set_lmbda(self, v):
        self._set_all("lmbda", v, lo=0.0)

    def get_lmbda(self):
        return self.param_groups[-1]["lmbda"]

    def set_lmbda_amplify(self, v):
        self._set_all("lmbda_amplify", v, lo=0.0)

    def get_lmbda_amplify(self):
        return self.param_groups[-1]["lmbda_amplify"]

    def set_hat_lmbda_coeff(self, v):
        self._set_all("hat_lmbda_coeff", v, lo=1.0)

    def get_hat_lmbda_coeff(self):
        return self.param_groups[-1]["hat_lmbda_coeff"]

    def set_eps(self, v):
        self._set_all("epsilon", v, lo=0.0, hi=1.0, hi_open=True)

    def get_eps(self):
        return max(g["epsilon"] for g in self.param_groups)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Optimizer state + DHSPG's partition/step state + the decay engine's state."""
        sd = super().state_dict()
        sd["dhspg"] = {
            "version": _STATE_VERSION,
            "num_steps": self.num_steps,
            "partitioned": self.partitioned,
            "needs_refill": self._needs_refill,
            "next_refill": self._next_refill,
            "num_released": self.num_released,
            "zigs": [(z.name, z.m, z.width) for z in self.zigs],
            "gp": {k: v.cpu().clone() for k, v in self._gp.items()},
            "released_at": {k: v.cpu().clone() for k, v in self._released_at.items()},
            "pending_marks": {k: v.cpu().clone() for k, v in self._pending_marks.items()},
            "engine": None if self.engine is None else self.engine.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "dhspg" not in state_dict:
            raise ValueError("DHSPG.load_state_dict: not a DHSPG state_dict (no 'dhspg' "
                             "entry); save it with DHSPG.state_dict()")
        sd = dict(state_dict)
        extra = sd.pop("dhspg")
        if extra.get("version") != _STATE_VERSION:
            raise ValueError(f"DHSPG.load_state_dict: state version {extra.get('version')} "
                             f"is not {_STATE_VERSION}")
        mine = [(z.name, z.m, z.width) for z in self.zigs]
        saved = [tuple(x) for x in extra["zigs"]]
        if saved != mine:
            diff = [(a, b) for a, b in zip(saved, mine) if a != b][:3]
            raise ValueError(f"DHSPG.load_state_dict: the checkpoint's zero-invariant groups "
                             f"({len(saved)}) do not match this model's ({len(mine)}); first "
                             f"differences (saved, here): {diff}. Load into the same "
                             f"(unpruned) model architecture")
        if (extra["engine"] is None) != (self.engine is None):
            raise ValueError("DHSPG.load_state_dict: the checkpoint was saved "
                             f"{'with' if extra['engine'] is not None else 'without'} decay, "
                             f"this optimizer is built "
                             f"{'with' if self.engine is not None else 'without'}; use the "
                             f"same decay setting to resume")
        super().load_state_dict(sd)
        self.num_steps = int(extra["num_steps"])
        self.partitioned = bool(extra["partitioned"])
        self._needs_refill = bool(extra["needs_refill"])
        self._next_refill = int(extra["next_refill"])
        self.num_released = int(extra["num_released"])
        for z in self.zigs:
            dev = z.params()[0].device
            self._gp[z.name] = extra["gp"][z.name].to(dev, torch.bool).clone()
            self._gp_count[z.name] = int(self._gp[z.name].sum())
            self._released_at[z.name] = extra["released_at"][z.name].to(dev).clone()
        self._pending_marks = {k: v.to(self._gp[k].device) for k, v in
                               extra["pending_marks"].items()}
        if self.engine is not None:
            self.engine.load_state_dict(extra["engine"])
        self._refresh_sparsity()


def dhspg(oto, lr: float = 0.1, *, decay=None, device=None, pruning_steps=None,
          pruning_periods=None, importance_score_criteria=None, **kwargs) -> DHSPG:
    """Drop-in for ``oto.dhspg(...)``: a :class:`DHSPG` over ``oto``'s zero-invariant groups.

    Accepts the keyword names of both only-train-once 2.0.x (``start_pruning_steps``,
    ``half_space_project_steps``, ``epsilon``, ``lmbda``, ...) and 3.0.1 (``start_pruning_step``,
    ``tolerance_group_sparsity``, ...). ``device`` is ignored (DHSPG follows the parameters);
    3.0.1's HESSO-only knobs ``pruning_steps``, ``pruning_periods`` and
    ``importance_score_criteria`` have no meaning for DHSPG and are rejected when set.
    ``decay``: ``None`` for the original single-step projection, or a
    :class:`dpm_core.DecayConfig` for the Decay Pruning Method.
    """
    graph = getattr(oto, "_graph", None)
    if graph is None or not hasattr(graph, "get_param_groups"):
        raise TypeError(f"dhspg() expects an only_train_once.OTO built with a model and a "
                        f"dummy input, got {type(oto).__name__}")
    for name, v in (("pruning_steps", pruning_steps), ("pruning_periods", pruning_periods),
                    ("importance_score_criteria", importance_score_criteria)):
        if v not in (None, 1, "default"):
            raise ValueError(f"dhspg(): {name} is a HESSO setting; DHSPG prunes by "
                             f"half-space projection (use start_pruning_step / "
                             f"half_space_project_steps), or use dpm_otov2.hesso(...)")
    opt = DHSPG(graph.get_param_groups(), lr=lr, decay=decay, **kwargs)
    oto._optimizer = opt
    return opt


def _oto_dhspg_factory(params, lr=0.1, weight_decay=None, first_momentum=None,
                       second_momentum=None, dampening=None, variant="sgd",
                       target_group_sparsity=0.5, tolerance_group_sparsity=None,
                       start_pruning_step=None, pruning_periods=1, pruning_steps=1,
                       group_divisible=1, fixed_zero_groups=True,
                       importance_score_criteria="default", device=None, **kwargs) -> DHSPG:
    """What only-train-once 3.0.1's ``OTO.dhspg`` calls as ``optimizer.DHSPG(...)``.

    Installed as ``only_train_once.optimizer.DHSPG`` by the ``oto_dhspg`` shim (for code
    that builds it directly; ``OTO.dhspg`` itself is replaced by :func:`oto_dhspg_method`).
    The tolerance defaults to OTOv2's 0.05.
    """
    for name, v in (("pruning_steps", pruning_steps), ("pruning_periods", pruning_periods),
                    ("importance_score_criteria", importance_score_criteria)):
        if v not in (None, 1, "default"):
            raise ValueError(f"OTO.dhspg(): {name} is a HESSO setting; DHSPG prunes by "
                             f"half-space projection (use oto.hesso(...) for HESSO)")
    return DHSPG(params, variant=variant, lr=lr, first_momentum=first_momentum,
                 second_momentum=second_momentum, dampening=dampening,
                 weight_decay=weight_decay, target_group_sparsity=target_group_sparsity,
                 tolerance_group_sparsity=tolerance_group_sparsity,
                 start_pruning_step=start_pruning_step, group_divisible=group_divisible,
                 fixed_zero_groups=fixed_zero_groups, **kwargs)


def oto_dhspg_method(self, lr: float = 0.1, **kwargs) -> DHSPG:
    """``only_train_once.OTO.dhspg`` after ``import dpm_otov2`` (the ``oto_dhspg`` shim).

    3.0.1's own method has no ``epsilon`` / ``lmbda`` (so the projection threshold stayed 0
    and the penalty at its default) and a tolerance default of 0.01; this one takes every
    keyword of :func:`dhspg` (2.0.x and 3.0.1 spellings, ``epsilon``, ``lmbda``,
    ``weight_decay_type``, ..., and ``decay=``) with OTOv2's defaults (tolerance 0.05).
    Only ``lr`` may be positional (2.0.x and 3.0.1 order the others differently).
    """
    return dhspg(self, lr, **kwargs)
