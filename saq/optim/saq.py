"""saq.SAQ: sharpness-aware quantization (and plain SAM / ASAM) around any torch optimizer.

One step (SAQ.md section 2), written for a loop that owns its forward/backward passes::

    loss = criterion(model(x), y); loss.backward()     # pass 1 (ascent)
    opt.ascent_step()                                   # global norm, perturb, zero grads
    criterion(model(x), y).backward()                   # pass 2 (descent) at the perturbed point
    opt.descent_step()                                  # restore, base step, zero grads

or ``loss = opt.step(closure)`` with a closure that runs forward + backward and returns the loss.

What is perturbed (model with saq.nn quantized layers):

* quantized layers' weights, never in place: Case 3 (default) adds ``s * dL/dQ(w)`` after the
  quantizer, Case 1 adds ``s * dL/dW`` after the quantizer, Case 2 quantizes ``W + s * dL/dW``;
  ``dL/dQ(w)`` is captured by the layer's quantizer output in pass 1 (no retain_grad, no copy of W);
* in place, saved and restored bit-exactly: quantized layers' biases, activation clips
  (``include_aclip``), weight clips (``include_wclip``), BatchNorm gamma/beta (``include_bn``);
* nothing else: unquantized layers and latent-weight gradients do not enter the norm.

``s = rho / (||g|| + 1e-12)`` with the norm over exactly the perturbed tensors' gradients.
Adaptive (ASAM-style, as the reference code): the norm uses ``g * (|p| + eta)`` and the
perturbation ``p^2 * g * s`` for weights, clips and BN gamma (``p`` is ``Q(w)`` in Case 3), plain
``g`` and ``g * s`` for biases and BN beta. A model without quantized layers gets plain SAM/ASAM
over all its parameters.

Non-finite gradients (pass 1 or pass 2): the step is skipped (no perturbation, no update reaches
the weights), a warning is issued and ``state_dict()["saq"]["skipped_steps"]`` counts it.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.optim import Optimizer

import saq_kernels as sk

from ..nn import QuantLayer

__all__ = ["SAQ"]

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
        check_finite: also skip the step when pass 2's gradients are non-finite (one extra
            multi-tensor norm over the gradients).
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
        check_finite: bool = True,
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
        self.model = model
        self.base_optimizer = base_optimizer
        self.rho, self.case, self.adaptive, self.eta = float(rho), case, adaptive, float(eta)
        self.check_finite = check_finite
        params = [p for g in base_optimizer.param_groups for p in g["params"]]
        super().__init__(params, dict(base_optimizer.defaults))
        self.param_groups = base_optimizer.param_groups
        self.qlayers: List[QuantLayer] = [m for m in model.modules() if isinstance(m, QuantLayer)]
        self.small: List[Tuple[nn.Parameter, bool]] = self._small_params(include_bn, include_aclip, include_wclip)
        self._backups: Dict[nn.Parameter, Tensor] = {}
        self._perturbed: List[nn.Parameter] = []
        self._skip = False
        self.skipped_steps = 0
        self.steps = 0
        self._set_capture(True)

    # ------------------------------------------------------------------ parameter sets
    def _small_params(self, include_bn: bool, include_aclip: bool, include_wclip: bool):
        """(parameter, adaptive) pairs perturbed in place, in a fixed order."""
        out: List[Tuple[nn.Parameter, bool]] = []
        seen = set()

        def add(p: Optional[Tensor], adaptive: bool) -> None:
            if isinstance(p, nn.Parameter) and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((p, adaptive))

        if not self.qlayers:  # plain SAM / ASAM: every parameter, biases without the adaptive factor
            for m in self.model.modules():
                for name, p in m.named_parameters(recurse=False):
                    add(p, not (name == "bias" or (isinstance(m, _BN) and name == "bias")))
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
        """Case 3: ask the quantized layers to keep Q(w) and dL/dQ(w) in the next pass."""
        for m in self.qlayers:
            m._saq_capture = on and self.case == 3
            if on:
                m._saq_qweight = m._saq_qgrad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the parameters' gradients and any dL/dQ(w) captured for the next ascent."""
        super().zero_grad(set_to_none=set_to_none)
        for m in self.qlayers:
            if m._saq_capture:
                m._saq_qweight = m._saq_qgrad = None

    # ------------------------------------------------------------------ the step
    def _weight_entries(self) -> List[Tuple[QuantLayer, Tensor, Tensor]]:
        """(layer, gradient, point) per quantized layer whose weight is perturbed."""
        entries = []
        for m in self.qlayers:
            if self.case == 3:
                g, p = m._saq_qgrad, m._saq_qweight
            else:
                g, p = m.weight.grad, m.weight.detach()
            if g is not None:
                entries.append((m, g, p))
        return entries

    @torch.no_grad()
    def ascent_step(self) -> None:
        """After pass 1's backward: compute the global norm, perturb, zero the gradients."""
        if self._perturbed or any(m._saq_e is not None for m in self.qlayers):
            raise RuntimeError("saq.SAQ.ascent_step: already perturbed; call descent_step() or restore_step() first")
        entries = self._weight_entries()
        small = [(p, a) for p, a in self.small if p.grad is not None]
        grads = [g for _, g, _ in entries] + [p.grad for p, _ in small]
        points = [pt for _, _, pt in entries] + [p.detach() for p, _ in small]
        flags = [self.adaptive] * len(entries) + [self.adaptive and a for _, a in small]
        self._set_capture(False)
        if not grads:
            self.zero_grad(set_to_none=True)
            return
        norm_sq, found_inf = sk.grad_sq_norm(grads, points, flags, self.eta)
        if self._nonfinite(found_inf, "pass 1"):
            self.zero_grad(set_to_none=True)
            return
        scale = self.rho / (norm_sq.sqrt() + 1e-12)
        for m, g, p in entries:
            e = p * p * g if self.adaptive else g
            m.set_perturbation(e, scale.to(g.device), before=self.case == 2)
        if small:
            params = [p for p, _ in small]
            backups = [self._backup(p) for p in params]
            sk.sam_perturb_(params, [p.grad for p in params], backups, scale.to(params[0].device),
                            [self.adaptive and a for _, a in small])
            self._perturbed = params
        self.zero_grad(set_to_none=True)
        for m in self.qlayers:  # captured tensors are now owned by the perturbation
            m._saq_qgrad = m._saq_qweight = None

    def _backup(self, p: Tensor) -> Tensor:
        b = self._backups.get(p)
        if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
            b = self._backups[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return b

    def _nonfinite(self, found_inf: Tensor, where: str) -> bool:
        # Host check: this path works with any base optimizer, which cannot skip on a device flag.
        if bool(found_inf.item()):
            self._skip = True
            warnings.warn(
                f"saq.SAQ: non-finite gradients in {where}; skipping this step (no perturbation and "
                f"no update reach the weights). Lower the learning rate or use a GradScaler.",
                RuntimeWarning,
                stacklevel=3,
            )
            return True
        return False

    @torch.no_grad()
    def _undo(self) -> None:
        if self._perturbed:
            sk.sam_restore_(self._perturbed, [self._backups[p] for p in self._perturbed])
            self._perturbed = []
        for m in self.qlayers:
            m.set_perturbation(None, None, False)

    @torch.no_grad()
    def restore_step(self) -> None:
        """Undo the perturbation without an optimizer step (for sharpness analysis)."""
        self._undo()
        self._skip = False
        self._set_capture(True)

    @torch.no_grad()
    def descent_step(self) -> None:
        """After pass 2's backward: restore, run the base optimizer's step, zero the gradients."""
        self._undo()
        if not self._skip and self.check_finite:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                _, found_inf = sk.grad_sq_norm(grads)
                self._nonfinite(found_inf, "pass 2")
        if self._skip:
            self.skipped_steps += 1
        else:
            self.base_optimizer.step()
        self.steps += 1
        self._skip = False
        self.zero_grad(set_to_none=True)
        self._set_capture(True)

    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """Both passes: ``closure()`` runs forward + backward and returns the loss.

        Gradients are zeroed before each pass. Returns the pass-1 loss.
        """
        if closure is None:
            raise RuntimeError(
                "saq.SAQ.step needs a closure (forward + backward, returning the loss); or call "
                "ascent_step() and descent_step() around your own two passes"
            )
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        self.ascent_step()
        with torch.enable_grad():
            closure()
        self.descent_step()
        return loss

    # ------------------------------------------------------------------ state
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
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "base" not in state_dict or "saq" not in state_dict:
            raise ValueError(
                "saq.SAQ.load_state_dict: expected a dict with keys 'base' and 'saq' (from SAQ.state_dict()); "
                "to load a plain optimizer state use opt.base_optimizer.load_state_dict(...)"
            )
        self.base_optimizer.load_state_dict(state_dict["base"])
        s = state_dict["saq"]
        self.rho, self.case, self.adaptive, self.eta = float(s["rho"]), int(s["case"]), bool(s["adaptive"]), float(s["eta"])
        self.steps, self.skipped_steps = int(s["steps"]), int(s["skipped_steps"])
        self.param_groups = self.base_optimizer.param_groups
        self._set_capture(True)

    def __repr__(self) -> str:
        return (
            f"SAQ(rho={self.rho}, case={self.case}, adaptive={self.adaptive}, quantized_layers={len(self.qlayers)}, "
            f"perturbed_small_params={len(self.small)}, base={type(self.base_optimizer).__name__})"
        )
