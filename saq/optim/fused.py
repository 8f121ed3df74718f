"""The fused restore + optimizer step behind saq.SAQ for torch.optim.SGD and torch.optim.AdamW.

One ``saq::sam_restore_sgd_`` / ``saq::sam_restore_adamw_`` launch per parameter group restores the
perturbed parameters (put first, with their backups) and steps every parameter with a gradient.
The optimizer state lives in ``base_optimizer.state[p]`` under torch's own keys
(``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``, ``step``), so the base optimizer's state_dict,
checkpoints and a later plain ``base.step()`` all keep working. The learning rate and the skip flag
are device tensors: the step makes no host sync, except SGD with ``dampening != 0`` on a step
that creates momentum buffers (the first one, or a parameter's first gradient), which reads the
flag to leave no buffer behind a skipped step, as torch.optim.SGD leaves none.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

import saq_kernels as sk


def fused_kind(base: Optimizer) -> Optional[str]:
    """"sgd" or "adamw" when every group uses options the fused ops implement, else None."""
    if type(base) is torch.optim.SGD:
        ok = all(not g.get("maximize") and not g.get("differentiable") for g in base.param_groups)
        return "sgd" if ok else None
    if type(base) is torch.optim.AdamW:
        ok = all(
            not g.get("maximize") and not g.get("differentiable") and not g.get("amsgrad")
            and not isinstance(g.get("lr"), Tensor)
            for g in base.param_groups
        )
        return "adamw" if ok else None
    return None


class FusedStep:
    """Restore + SGD/AdamW step in one launch per group (see the module docstring)."""

    def __init__(self, base: Optimizer, kind: str):
        self.base, self.kind = base, kind
        self._lr: Dict[tuple, Tensor] = {}

    def _lr_tensor(self, gi: int, lr: float, like: Tensor) -> Tensor:
        # fp64 parameters get an fp64 lr, so a float64 run matches torch.optim to fp64 rounding
        dt = torch.float64 if like.dtype == torch.float64 else torch.float32
        key = (gi, like.device, dt)
        t = self._lr.get(key)
        if t is None:
            t = self._lr[key] = torch.empty((), dtype=dt, device=like.device)
        # a float lr: a kernel with a scalar argument (no host-to-device copy, no sync), whose
        # value a captured CUDA graph then keeps; a 0-dim tensor lr on the same device
        # (torch.optim's capturable style, updated in place by LR schedulers): a device copy,
        # so each graph replay reads its current value
        t.fill_(lr)
        return t

    @torch.no_grad()
    def step(self, backups: Dict[Tensor, Tensor], perturbed: List[Tensor], found_inf: Optional[Tensor]) -> None:
        pert = set(perturbed)
        for gi, group in enumerate(self.base.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                # a perturbed parameter without a gradient still has to be restored
                continue
            order = [p for p in params if p in pert] + [p for p in params if p not in pert]
            nb = sum(1 for p in params if p in pert)
            lr = self._lr_tensor(gi, group["lr"], order[0])
            if self.kind == "sgd":
                self._sgd(group, order, [backups[p] for p in order[:nb]], lr, found_inf)
            else:
                self._adamw(group, order, [backups[p] for p in order[:nb]], lr, found_inf)
        # perturbed parameters that had no gradient: restore only
        orphans = [p for p in perturbed if p.grad is None]
        if orphans:
            sk.sam_restore_(orphans, [backups[p] for p in orphans])
        # What torch's LR schedulers look for after optimizer.step() (their step wrapper sets it);
        # step hooks registered on the base optimizer do not run here: use SAQ(fused=False).
        self.base._opt_called = True

    def _sgd(self, group, params, backups, lr, found_inf) -> None:
        momentum = group["momentum"]
        if momentum == 0:
            self._sgd_call(group, params, backups, [], False, lr, found_inf)
            return
        # torch creates the buffer as a copy of the first update: parameters whose buffer is new
        # this step go in a call of their own (first_step=True), keeping the perturbed prefix.
        nb = len(backups)
        new = [self.base.state[p].get("momentum_buffer") is None for p in params]
        for p, is_new in zip(params, new):
            if is_new:
                self.base.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for flag in (True, False):
            idx = [i for i, n in enumerate(new) if n == flag]
            if not idx:
                continue
            ps = [params[i] for i in idx]
            bk = [backups[i] for i in idx if i < nb]
            bufs = [self.base.state[p]["momentum_buffer"] for p in ps]
            self._sgd_call(group, ps, bk, bufs, flag, lr, found_inf)
        # A skipped first step must leave no buffer, as torch (which never stepped) leaves none:
        # the next step is then the first (buf = d). With dampening 0 a zero buffer gives the
        # same numbers (0 * momentum + d); otherwise ask the host, on first steps only.
        if any(new) and found_inf is not None and group["dampening"] != 0 and bool(found_inf.item()):
            for p, is_new in zip(params, new):
                if is_new:
                    del self.base.state[p]["momentum_buffer"]

    def _sgd_call(self, group, params, backups, bufs, first, lr, found_inf) -> None:
        sk.sam_restore_sgd_(
            params, backups, [p.grad for p in params], bufs, lr, group["momentum"], group["dampening"],
            group["weight_decay"], group["nesterov"], first, found_inf,
        )

    def _adamw(self, group, params, backups, lr, found_inf) -> None:
        m, v, steps = [], [], []
        for p in params:
            st = self.base.state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if st["step"].device != p.device:
                st["step"] = st["step"].to(p.device)
            m.append(st["exp_avg"])
            v.append(st["exp_avg_sq"])
            steps.append(st["step"])
        beta1, beta2 = group["betas"]
        sk.sam_restore_adamw_(
            params, backups, [p.grad for p in params], m, v, steps, lr, beta1, beta2,
            group["eps"], group["weight_decay"], found_inf,
        )
