"""saq.SAQ: sharpness-aware quantization (and plain SAM / ASAM) around any torch optimizer.

One step (the SAQ reference code's Case-3 step; paper: arXiv 2111.12273), written for a loop
that owns its forward/backward passes::

    loss = criterion(model(x), y); loss.backward()     # pass 1 (ascent)
    opt.ascent_step()                                   # global norm, perturb, zero grads
    criterion(model(x), y).backward()                   # pass 2 (descent) at the perturbed point
    opt.descent_step()                                  # restore, base step, zero grads

or ``loss = opt.step(closure)`` with a closure that runs forward + backward and returns the loss.

What is perturbed (model with saq.nn quantized layers):

* quantized layers' weights, never in place: Case 3 (default) adds ``s * dL/dQ(w)`` after the
  quantizer, Case 1 adds ``s * dL/dW`` after the quantizer, Case 2 quantizes ``W + s * dL/dW``;
  ``dL/dQ(w)`` is captured by the layer's quantizer output in pass 1 (no retain_grad, no copy of W);
* in place, saved and restored bit-exactly with one multi-tensor launch each: quantized layers'
  biases, activation clips (``include_aclip``), weight clips (``include_wclip``), BatchNorm
  gamma/beta (``include_bn``);
* nothing else: unquantized layers and latent-weight gradients do not enter the norm.

``s = rho / (||g|| + 1e-12)`` with the norm over exactly the perturbed tensors' gradients.
Adaptive (ASAM-style, as the reference code): the norm uses ``g * (|p| + eta)`` and the
perturbation ``p^2 * g * s`` for weights, clips and BN gamma (``p`` is ``Q(w)`` in Case 3), plain
``g`` and ``g * s`` for biases and BN beta. A model without quantized layers gets plain SAM/ASAM
over all its parameters.

No host sync: the norm, the scale and the non-finite flag stay on the device. With
torch.optim.SGD or AdamW the restore is fused with the update (saq::sam_restore_sgd_ /
saq::sam_restore_adamw_, ``fused=True``), and with a torch optimizer built with ``fused=True`` the
flag is handed to it as GradScaler does; only other optimizers need a host check to skip a step.

Non-finite gradients (pass 1 or pass 2): the step is skipped (no perturbation and no update reach
the weights) and counted in ``skipped_steps``; the warning is issued when that count is read
(``opt.skipped_steps``, ``state_dict()``), never inside a step.
"""
from __future__ import annotations

import functools
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.optim import Optimizer

import saq_kernels as sk

from ..nn import QuantLayer
from .fused import FusedStep, fused_kind

__all__ = ["SAQ"]

# The optimizer's bookkeeping (which tensors are perturbed, backups, counters) is host-side Python
# state that Dynamo would have to replay as side effects; inside a compiled training step it runs
# eagerly, like the Tensor.backward() calls around it. The model's forward and backward, where
# the saq ops are, compile without graph breaks (tests/training/test_fast_step.py).
# (torch.compiler.disable is applied lazily: calling it at import would import Dynamo, and with it
# Triton, on every `import saq`.)


def _eager(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "torch._dynamo" in sys.modules and torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def _replicas() -> int:
    """The torch.distributed world size (1 outside a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _either(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """The non-finite flags a OR b, as 0.0 / 1.0 on a's device (None: no flag).

    Flags are combined this way, never summed: torch's fused optimizers skip a step only when
    their found_inf is exactly 1.0 (a 2.0 from two overflows would write inf into the weights).
    """
    if a is None or b is None:
        return b if a is None else a
    return torch.maximum(a > 0, b.to(a.device) > 0).to(a.dtype)


_BN = nn.modules.batchnorm._BatchNorm
_ACLIP = ("activation_clip_value", "activation_scale", "activation_zero_point")
_WCLIP = ("weight_clip_value", "weight_scale")
_NOT_ADAPTIVE = ("activation_zero_point",)  # offsets behave like biases


class SAQ(Optimizer):
    """Sharpness-aware quantization around ``base_optimizer`` (see the module docstring).

    Args:
        model: the (quantized) model, possibly wrapped in DDP.
        base_optimizer: any torch optimizer over the model's parameters (the reference recipe:
            SGD, momentum 0.9, Nesterov, weight decay 1e-4, a separate lr group for clips).
        rho: neighbourhood radius. case: 1, 2 or 3 (SAQ, default). adaptive, eta: ASAM variant.
        include_bn, include_aclip, include_wclip: which small parameters are perturbed.
        fused: fuse the restore with an SGD/AdamW update (default: when the base optimizer is
            torch.optim.SGD or AdamW with options the fused ops implement).
        check_finite: also skip the step when pass 2's gradients are non-finite (one extra
            multi-tensor norm over the gradients).
        ascent_every: the efficient mode (ours, not the paper's): a full ascent every k steps;
            in between, the last perturbation is re-applied and each step costs one
            forward-backward. 1 (default) is exact SAQ.
        sync_ascent: under torch.distributed, average the ascent gradients over replicas (the
            reference skips this: each replica perturbs with its local gradient). Run pass 1
            without DDP's no_sync() so the parameter gradients are averaged too.
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: Optimizer,
        rho: float = 0.05,
        case: int = 3,
        adaptive: bool = False,
        eta: float = 0.01,
        include_bn: bool = True,
        include_aclip: bool = True,
        include_wclip: bool = False,
        fused: Optional[bool] = None,
        check_finite: bool = True,
        ascent_every: int = 1,
        sync_ascent: bool = False,
    ):
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(
                "saq.SAQ: base_optimizer must be a torch.optim.Optimizer instance, e.g. "
                "torch.optim.SGD(model.parameters(), lr=0.01)"
            )
        if case not in (1, 2, 3):
            raise ValueError(f"saq.SAQ: case={case!r}; choose 1, 2 or 3 (3 is SAQ)")
        if not rho >= 0:
            raise ValueError(f"saq.SAQ: rho={rho!r} must be >= 0")
        if int(ascent_every) != ascent_every or ascent_every < 1:
            raise ValueError(f"saq.SAQ: ascent_every={ascent_every!r} must be an integer >= 1")
        kind = fused_kind(base_optimizer)
        if fused and kind is None:
            tensor_lr = any(isinstance(g.get("lr"), torch.Tensor) for g in base_optimizer.param_groups)
            raise ValueError(
                f"saq.SAQ: fused=True needs torch.optim.SGD or torch.optim.AdamW (no maximize, "
                f"amsgrad or differentiable; AdamW with a float lr), got "
                f"{type(base_optimizer).__name__}{' with a tensor lr' if tensor_lr else ''}; use fused=False"
            )
        self.model = model
        self.base_optimizer = base_optimizer
        self.rho, self.case, self.adaptive, self.eta = float(rho), case, adaptive, float(eta)
        self.check_finite, self.ascent_every, self.sync_ascent = check_finite, int(ascent_every), sync_ascent
        params = [p for g in base_optimizer.param_groups for p in g["params"]]
        super().__init__(params, dict(base_optimizer.defaults))
        self.param_groups = base_optimizer.param_groups
        self._fused = FusedStep(base_optimizer, kind) if (fused is None and kind) or fused else None
        self.qlayers: List[QuantLayer] = [m for m in model.modules() if isinstance(m, QuantLayer)]
        # what SAM perturbs: the trained parameters (in the base optimizer, requiring grad), as the
        # reference's loop over param_groups; a frozen layer is neither captured nor perturbed
        self._trained = {id(p) for g in base_optimizer.param_groups for p in g["params"] if p.requires_grad}
        self.small: List[Tuple[nn.Parameter, bool]] = self._small_params(include_bn, include_aclip, include_wclip)
        self._backups: Dict[Tensor, Tensor] = {}
        self._perturbed: List[Tensor] = []
        self._found_inf: Optional[Tensor] = None  # pass-1 flag of the current step (device)
        self._skipped: Optional[Tensor] = None  # device counter
        self._skipped_seen = 0
        self._acc: Dict[Tensor, Tensor] = {}  # accumulated descent gradients (micro-batches)
        self._acc_inf: Optional[Tensor] = None  # their ascents' non-finite flags, OR-ed
        self._last: Optional[dict] = None  # last perturbation, for ascent_every > 1
        # where the step stands: an ascent (or a reused perturbation) awaits its descent; micro-
        # batches were accumulated. descent_step() needs one of them (a second call would step
        # with zeroed gradients and count a step that never happened).
        self._ascended = False
        self._accumulated = False
        self.steps = 0
        self._set_capture(True)

    # ------------------------------------------------------------------ parameter sets
    def _small_params(self, include_bn: bool, include_aclip: bool, include_wclip: bool):
        """(parameter, adaptive) pairs perturbed in place, in a fixed order."""
        out: List[Tuple[nn.Parameter, bool]] = []
        seen = set()

        def add(p: Optional[Tensor], adaptive: bool) -> None:
            if isinstance(p, nn.Parameter) and id(p) in self._trained and id(p) not in seen:
                seen.add(id(p))
                out.append((p, adaptive))

        if not self.qlayers:  # plain SAM / ASAM: every parameter; biases without the adaptive factor
            for m in self.model.modules():
                for name, p in m.named_parameters(recurse=False):
                    add(p, name != "bias")
            return out
        for m in self.qlayers:
            add(m.bias, False)
            if include_aclip:
                for n in _ACLIP:
                    add(getattr(m, n, None), n not in _NOT_ADAPTIVE)
            if include_wclip:
                for n in _WCLIP:
                    add(getattr(m, n, None), True)
        if include_bn:
            for m in self.model.modules():
                if isinstance(m, _BN) and m.affine:
                    add(m.weight, True)
                    add(m.bias, False)
        return out

    def _set_capture(self, on: bool) -> None:
        """Case 3: ask the quantized layers to capture dL/dQ(w) in the next pass."""
        for m in self.qlayers:
            m._saq_capture = on and self.case == 3 and self._trains_weight(m)
            if m._saq_capture:
                m._probe()  # allocated here, outside any compiled forward
            if on:
                m.clear_captured_grad()

    @_eager
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the parameters' gradients and any dL/dQ(w) captured for the next ascent."""
        super().zero_grad(set_to_none=set_to_none)
        for m in self.qlayers:
            m.clear_captured_grad()

    # ------------------------------------------------------------------ ascent
    def needs_ascent(self) -> bool:
        """False on the steps where the efficient mode re-applies the last perturbation."""
        return self._last is None or self.steps % self.ascent_every == 0

    def _trains_weight(self, m: QuantLayer) -> bool:
        return id(m.weight) in self._trained

    def _weight_entries(self) -> List[Tuple[QuantLayer, Tensor, Tensor]]:
        """(layer, gradient, point) per quantized layer whose weight is perturbed."""
        entries = []
        for m in self.qlayers:
            if not self._trains_weight(m):
                continue
            if self.case == 3:
                g = m.captured_grad
                # the adaptive factor needs X = Q(w): recomputed (one quantizer pass) only then
                p = m.quantize_weight().detach() if self.adaptive and g is not None else g
            else:
                g, p = m.weight.grad, m.weight.detach()
            if g is not None:
                entries.append((m, g, p))
        return entries

    @_eager
    @torch.no_grad()
    def ascent_step(self, grad_scaler: Optional["torch.amp.GradScaler"] = None) -> None:
        """After pass 1's backward: global norm, perturbation, zeroed gradients. No host sync.

        With a GradScaler (fp16), the gradients are unscaled before the norm; an inf/NaN makes
        the whole step a skip, as GradScaler skips, and lowers the scale at descent_step.
        """
        if self._perturbed or any(m._saq_e is not None for m in self.qlayers):
            raise RuntimeError("saq.SAQ.ascent_step: already perturbed; call descent_step() or restore_step() first")
        entries = self._weight_entries()
        small = [(p, a) for p, a in self.small if p.grad is not None]
        grads = [g for _, g, _ in entries] + [p.grad for p, _ in small]
        points = [pt for _, _, pt in entries] + [p.detach() for p, _ in small]
        flags = [self.adaptive] * len(entries) + [self.adaptive and a for _, a in small]
        # Cases 1/2: a weight shared by several layers enters the norm once (its gradient is the
        # parameter's); each of those layers is still perturbed. Case 3's dL/dQ(w) are per layer.
        norm_idx = list(range(len(grads)))
        if self.case != 3:
            seen, norm_idx = set(), []
            for i, (m, _, _) in enumerate(entries):
                if id(m.weight) not in seen:
                    seen.add(id(m.weight))
                    norm_idx.append(i)
            norm_idx += list(range(len(entries), len(grads)))
        self._set_capture(False)
        self._ascended = True
        if not grads:
            self.zero_grad(set_to_none=True)
            return
        if grad_scaler is not None and grad_scaler.is_enabled():
            inv = grad_scaler._scale.double().reciprocal().float()
            grads = [g * inv.to(g.device, g.dtype) for g in grads]
        if self.sync_ascent:
            grads = self._all_reduce_mean(grads, len(entries))
        norm_sq, found_inf = sk.grad_sq_norm([grads[i] for i in norm_idx], [points[i] for i in norm_idx],
                                             [flags[i] for i in norm_idx], self.eta)
        skip = found_inf > 0
        scale = torch.where(skip, 0.0, self.rho / (norm_sq.sqrt() + 1e-12))
        # where(skip, 0, g): a skipped step must not see 0 * inf = NaN in its perturbation.
        gs = [torch.where(skip, 0.0, g) for g in grads]
        weights = []
        for (m, _, p), g in zip(entries, gs[: len(entries)]):
            e = p * p * g if self.adaptive else g
            m.set_perturbation(e, scale.to(e.device), before=self.case == 2)
            weights.append((m, e))
        params = [p for p, _ in small]
        if params:
            backups = [self._backup(p) for p in params]
            sk.sam_perturb_(params, gs[len(entries):], backups, scale.to(params[0].device),
                            [self.adaptive and a for _, a in small])
            self._perturbed = params
        if self.ascent_every > 1:
            deltas = [p - b for p, b in zip(params, [self._backups[p] for p in params])]
            self._last = self._kept_on_skip(
                {"weights": weights, "scale": scale, "small": list(zip(params, deltas))}, skip)
        self._found_inf = found_inf
        self.zero_grad(set_to_none=True)

    def _kept_on_skip(self, new: Dict[str, Any], skip: Tensor) -> Dict[str, Any]:
        """Efficient mode: the perturbation the next k-1 steps re-apply. A skipped ascent
        (non-finite gradients: scale 0, gradients zeroed) must not become it, or those steps
        would silently train without a perturbation: where the previous one covers the same
        layers and parameters, it is kept, chosen on the device (no host sync). Without one (the
        very first ascent skipped) the zero perturbation stands until the next full ascent.
        In place into ``new``'s tensors, all made by this ascent: no second copy of the weights'
        perturbation is kept (on a skipped step they only feed a pass 2 that is thrown away)."""
        old = self._last

        def layout(last: Dict[str, Any]) -> list:
            return ([(id(m), e.shape) for m, e in last["weights"]]
                    + [(id(p), d.shape) for p, d in last["small"]])

        if old is None or layout(old) != layout(new):
            return new

        def pick(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(skip.to(b.device), a, b, out=b)

        return {"weights": [(m, pick(eo, en)) for (m, eo), (_, en) in zip(old["weights"], new["weights"])],
                "scale": pick(old["scale"], new["scale"]),
                "small": [(p, pick(do, dn)) for (p, do), (_, dn) in zip(old["small"], new["small"])]}

    @_eager
    @torch.no_grad()
    def reuse_perturbation(self) -> None:
        """Efficient mode: re-apply the last ascent's perturbation instead of a new pass 1."""
        if self._last is None:
            raise RuntimeError("saq.SAQ.reuse_perturbation: no earlier ascent; call ascent_step() first")
        self._set_capture(False)
        for m, e in self._last["weights"]:
            m.set_perturbation(e, self._last["scale"], before=self.case == 2)
        params = [p for p, _ in self._last["small"]]
        if params:
            for p, d in self._last["small"]:
                self._backup(p).copy_(p)
                p.add_(d)
            self._perturbed = params
        self._found_inf = None
        self._ascended = True
        self.zero_grad(set_to_none=True)

    def _all_reduce_mean(self, grads: List[Tensor], n_captured: int) -> List[Tensor]:
        import torch.distributed as dist

        if _replicas() == 1:
            return grads
        # Parameter gradients were averaged by DDP in pass 1; the captured dL/dQ(w) were not.
        captured = grads[:n_captured]
        if captured:
            flat = torch.cat([g.reshape(-1) for g in captured])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            out, i = [], 0
            for g in captured:
                out.append(flat[i : i + g.numel()].view_as(g))
                i += g.numel()
            grads = out + grads[n_captured:]
        return grads

    def _backup(self, p: Tensor) -> Tensor:
        b = self._backups.get(p)
        if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
            b = self._backups[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return b

    # ------------------------------------------------------------------ descent
    @torch.no_grad()
    def _clear_perturbation(self) -> None:
        for m in self.qlayers:
            m.set_perturbation(None, None, False)

    @_eager
    @torch.no_grad()
    def restore_step(self) -> None:
        """Undo the perturbation without an optimizer step (for sharpness analysis)."""
        if self._perturbed:
            sk.sam_restore_(self._perturbed, [self._backups[p] for p in self._perturbed])
            self._perturbed = []
        self._clear_perturbation()
        self._found_inf = None
        self._ascended = False
        self._set_capture(True)

    @_eager
    @torch.no_grad()
    def accumulate(self) -> None:
        """Gradient accumulation: end one micro-batch after its pass-2 backward.

        Restores the perturbation, adds the descent gradients to an accumulator and zeroes the
        parameters' gradients, so the next micro-batch's ascent sees only its own gradient.
        descent_step() then steps once with the accumulated sum (divide each micro-batch's loss
        by their number, as in plain accumulation; the perturbation does not depend on it).
        """
        if not self._ascended:
            raise RuntimeError(
                "saq.SAQ.accumulate: no ascent for this micro-batch; call ascent_step() after its "
                "pass-1 backward and accumulate() after its pass-2 backward"
            )
        found_inf = self._found_inf
        self.restore_step()
        self._accumulated = True
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                if p in self._acc:
                    self._acc[p].add_(p.grad)
                else:
                    self._acc[p] = p.grad
                p.grad = None
        if found_inf is not None:
            self._acc_inf = _either(self._acc_inf, found_inf)

    def _pass2_found_inf(self) -> Optional[Tensor]:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        return sk.grad_sq_norm(grads)[1]

    def _count_skip(self, found_inf: Tensor) -> None:
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.int64, device=found_inf.device)
        self._skipped += (found_inf > 0).to(torch.int64)

    @_eager
    @torch.no_grad()
    def descent_step(self, grad_scaler: Optional["torch.amp.GradScaler"] = None) -> None:
        """After pass 2's backward: restore, base-optimizer step, zero the gradients.

        With a GradScaler: unscale, skip on inf/NaN (from either pass) exactly as
        ``grad_scaler.step`` does, then ``grad_scaler.update()``.
        """
        if not (self._ascended or self._accumulated):
            raise RuntimeError(
                "saq.SAQ.descent_step: no ascent since the last step; call ascent_step() after "
                "pass 1's backward (or reuse_perturbation() in the efficient mode) before pass 2"
            )
        if self._acc:
            # the earlier micro-batches' ascent flags and, when this one was not accumulated,
            # its own
            self._found_inf = _either(self._acc_inf, self._found_inf)
            for p, g in self._acc.items():
                if p.grad is not None:
                    g.add_(p.grad)
                p.grad = g
            self._acc, self._acc_inf = {}, None
        scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        if scaler is not None:
            scaler.unscale_(self.base_optimizer)
        found_inf = self._found_inf
        if self.check_finite and scaler is None:
            f2 = self._pass2_found_inf()
            if f2 is not None:
                found_inf = _either(found_inf, f2)
        if scaler is not None:
            self._merge_into_scaler(scaler, found_inf)
            found_inf = self._scaler_found_inf(scaler)
        if self._fused is not None:
            self._fused.step(self._backups, self._perturbed, found_inf)
            self._perturbed = []
        else:
            self.restore_step()
            self._base_step(found_inf, scaler)
        if found_inf is not None:
            self._count_skip(found_inf)
        if scaler is not None:
            scaler.update()
        self._clear_perturbation()
        self._found_inf = None
        self._ascended = self._accumulated = False
        self.steps += 1
        self.zero_grad(set_to_none=True)
        self._set_capture(True)

    def _merge_into_scaler(self, scaler, found_inf: Optional[Tensor]) -> None:
        # GradScaler skips and lowers its scale from the flags unscale_() recorded for pass 2;
        # pass 1's flag is added so an overflow in the ascent is treated the same way.
        if found_inf is None:
            return
        state = scaler._per_optimizer_states[id(self.base_optimizer)]
        for dev, flag in state["found_inf_per_device"].items():
            flag.copy_(_either(flag, found_inf))

    def _scaler_found_inf(self, scaler) -> Tensor:
        flags = list(scaler._per_optimizer_states[id(self.base_optimizer)]["found_inf_per_device"].values())
        out = flags[0]
        for f in flags[1:]:
            out = _either(out, f)
        return out

    def _base_step(self, found_inf: Optional[Tensor], scaler) -> None:
        base = self.base_optimizer
        if scaler is not None:
            scaler.step(base)  # GradScaler handles the skip (on the device for fused optimizers)
            return
        if found_inf is None:
            base.step()
        elif getattr(base, "_step_supports_amp_scaling", False):
            # torch's fused optimizers read a device found_inf, as GradScaler passes it: no sync
            base.grad_scale, base.found_inf = None, (found_inf > 0).float()
            try:
                base.step()
            finally:
                base.grad_scale = base.found_inf = None
        elif not bool(found_inf.item()):  # any other optimizer: a host check is unavoidable
            base.step()

    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """Both passes: ``closure()`` runs forward + backward and returns the loss.

        Gradients are zeroed before each pass. Returns the pass-1 loss (in the efficient mode's
        reuse steps, the loss at the perturbed point).
        """
        if closure is None:
            raise RuntimeError(
                "saq.SAQ.step needs a closure (forward + backward, returning the loss); or call "
                "ascent_step() and descent_step() around your own two passes"
            )
        self.zero_grad(set_to_none=True)
        if self.needs_ascent():
            with torch.enable_grad():
                loss = closure()
            self.ascent_step()
            with torch.enable_grad():
                closure()
        else:
            self.reuse_perturbation()
            with torch.enable_grad():
                loss = closure()
        self.descent_step()
        return loss

    # ------------------------------------------------------------------ state
    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (reading it syncs, and warns on new skips)."""
        n = 0 if self._skipped is None else int(self._skipped.item())
        if n > self._skipped_seen:
            warnings.warn(
                f"saq.SAQ: {n - self._skipped_seen} step(s) skipped for non-finite gradients "
                f"({n} in total); lower the learning rate or use a GradScaler",
                RuntimeWarning,
                stacklevel=2,
            )
            self._skipped_seen = n
        return n

    def state_dict(self) -> dict:
        return {
            "base": self.base_optimizer.state_dict(),
            "saq": {
                "rho": self.rho,
                "case": self.case,
                "adaptive": self.adaptive,
                "eta": self.eta,
                "steps": self.steps,
                "skipped_steps": self.skipped_steps,
                "ascent_every": self.ascent_every,
                "last": self._last_state(),
            },
        }

    def _last_state(self) -> Optional[dict]:
        """The efficient mode's last perturbation by position (quantized layer, perturbed small
        parameter), so that a resumed run re-applies it as the uninterrupted one would."""
        if self._last is None:
            return None
        layer_pos = {id(m): i for i, m in enumerate(self.qlayers)}
        small_pos = {id(p): i for i, (p, _) in enumerate(self.small)}
        return {
            "weights": {layer_pos[id(m)]: e for m, e in self._last["weights"]},
            "scale": self._last["scale"],
            "small": {small_pos[id(p)]: d for p, d in self._last["small"]},
        }

    def _load_last(self, last: Optional[dict]) -> Optional[dict]:
        if last is None:
            return None
        try:
            weights = [(self.qlayers[int(i)], e.to(self.qlayers[int(i)].weight.device))
                       for i, e in last["weights"].items()]
            small = [(self.small[int(i)][0], d.to(self.small[int(i)][0].device))
                     for i, d in last["small"].items()]
            pairs = [("perturbation", e, "weight", m.weight) for m, e in weights]
            pairs += [("delta", d, "parameter", p) for p, d in small]
            for saved, t, of, target in pairs:
                if t.shape != target.shape:
                    raise IndexError(f"a {saved} of shape {tuple(t.shape)} for a {of} of {tuple(target.shape)}")
            scale = last["scale"].to(weights[0][0].weight.device if weights else last["scale"].device)
        except (KeyError, IndexError, AttributeError, TypeError) as exc:
            raise ValueError(
                f"saq.SAQ.load_state_dict: the saved efficient-mode perturbation does not fit this "
                f"model ({exc}); load the state into the model it was saved from") from exc
        return {"weights": weights, "scale": scale, "small": small}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "base" not in state_dict or "saq" not in state_dict:
            raise ValueError(
                "saq.SAQ.load_state_dict: expected a dict with keys 'base' and 'saq' (from SAQ.state_dict()); "
                "to load a plain optimizer state use opt.base_optimizer.load_state_dict(...)"
            )
        s = state_dict["saq"]
        last = self._load_last(s.get("last"))  # validated before any state changes
        if last is not None and not self.sync_ascent and _replicas() > 1:
            # each replica perturbs with its local gradient, and only one replica's perturbation
            # was saved: every replica starts over with a full ascent instead
            last = None
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.rho, self.case, self.adaptive, self.eta = float(s["rho"]), int(s["case"]), bool(s["adaptive"]), float(s["eta"])
        self.steps = int(s["steps"])
        self.ascent_every = int(s.get("ascent_every", 1))
        dev = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        self._skipped = torch.tensor(int(s["skipped_steps"]), dtype=torch.int64, device=dev)
        self._skipped_seen = int(s["skipped_steps"])
        self.param_groups = self.base_optimizer.param_groups
        # the efficient mode's last perturbation (None: the next step makes a full ascent)
        self._last = last
        self._set_capture(True)

    def __repr__(self) -> str:
        return (
            f"SAQ(rho={self.rho}, case={self.case}, adaptive={self.adaptive}, quantized_layers={len(self.qlayers)}, "
            f"perturbed_small_params={len(self.small)}, fused={self._fused is not None}, "
            f"ascent_every={self.ascent_every}, base={type(self.base_optimizer).__name__})"
        )
