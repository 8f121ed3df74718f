"""Quantized layers: QConv2d and QLinear, with weight and input fake quantizers.

Quantizers (``quantizer=``):

* ``"liq"`` (the SAQ reference code's quantizer): parameters ``weight_clip_value`` and
  ``activation_clip_value`` (shape [1], the reference code's names, so its checkpoints load).
  Conv weights are standardized; linear weights are not. Init as the reference: linear clips
  ``0.8 * max|W|`` and ``0.8 * max|input|`` on the first batch; conv clips start at 1.0.
* ``"lsq"``: ``weight_scale`` ([1] or [C_out] per channel) and ``activation_scale`` ([1]); signed
  weights in ``[-2^(b-1), 2^(b-1) - 1]``, unsigned activations in ``[0, 2^b - 1]``; LSQ's gradient
  scale ``1/sqrt(numel * Qp)`` (numel of the weight tensor; of one sample for activations, as
  the LSQ paper). Data-driven init on the first batch: ``s = 2 mean|t| / sqrt(Qp)``.
* ``"lsq+"``: LSQ plus a learned activation offset ``activation_zero_point``; activations init from
  the first batch's min/max (``s = (max - min) / (2^b - 1)``, ``zp = -min / s``).
* ``"pact"``: DoReFa weights and PACT activations (``activation_clip_value``, init 0.8 max|x|).
* ``"dorefa"``: DoReFa weights and activations (no learned parameters).

Bits 2..8, or 32 for "not quantized". SAQ hooks: the optimizer (saq.SAQ) sets a perturbation
``(e, s, before)`` used by the weight quantizer's forward (``Q(w) + s*e`` or ``Q(w + s*e)``), and in
its ascent pass (Case 3) asks the layer for ``dL/dQ(w)``: the forward then computes
``Q(w) + 1 * probe`` with a zero "probe" tensor (not a parameter) so that autograd leaves
``dL/dQ(w)`` in ``probe.grad`` - no retain_grad, no tensor hook (hooks break torch.compile graphs).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import saq_kernels as sk

from .functional import dorefa_activation, dorefa_weight, pact_activation

QUANTIZERS = ("liq", "lsq", "lsq+", "pact", "dorefa")
INIT_KEY = "quant_initialized"  # state-dict entry: has the first-batch init run?
BITS_KEY = "quant_bits"  # state-dict entry: [bits_weights, bits_activations] it was trained with


def _check_bits(name: str, bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not (2 <= bits <= 8 or bits == 32):
        raise ValueError(f"saq.nn: {name}={bits!r} is not supported; use 2..8, or 32 to disable quantization")
    return bits


class QuantLayer:
    """Mixin holding the quantizer state shared by QConv2d and QLinear."""

    weight: nn.Parameter

    def _setup_quant(
        self,
        bits_weights: int,
        bits_activations: int,
        quantizer: str,
        per_channel: bool,
        standardize: bool,
        signed_activations: bool,
    ) -> None:
        if quantizer not in QUANTIZERS:
            raise ValueError(f"saq.nn: unknown quantizer {quantizer!r}; choose one of {QUANTIZERS}")
        if per_channel and quantizer not in ("lsq", "lsq+"):
            raise ValueError(
                f"saq.nn: per_channel=True needs a quantizer with a per-channel scale ('lsq' or 'lsq+'); "
                f"{quantizer!r} has one clip per tensor"
            )
        self.bits_weights = _check_bits("bits_weights", bits_weights)
        self.bits_activations = _check_bits("bits_activations", bits_activations)
        self.quantizer = quantizer
        self.per_channel = per_channel
        self.standardize = standardize
        self.signed_activations = signed_activations
        # The layer computes layer(relu(x)) itself (saq/nn/relu_fold.py); set by quantize_model.
        self.input_relu = False
        dev = dict(device=self.weight.device, dtype=self.weight.dtype)
        if quantizer == "liq":
            init = 1.0 if isinstance(self, nn.Conv2d) else 2.0  # the reference code's constructors
            self.weight_clip_value = nn.Parameter(torch.tensor([init], **dev))
            self.activation_clip_value = nn.Parameter(torch.tensor([init], **dev))
        elif quantizer in ("lsq", "lsq+"):
            nw = self.weight.shape[0] if per_channel else 1
            self.weight_scale = nn.Parameter(torch.ones(nw, **dev))
            self.register_buffer("weight_zero_point", torch.zeros(nw, **dev))
            self.activation_scale = nn.Parameter(torch.ones(1, **dev))
            if quantizer == "lsq+":
                self.activation_zero_point = nn.Parameter(torch.zeros(1, **dev))
            else:
                self.register_buffer("activation_zero_point", torch.zeros(1, **dev))
        elif quantizer == "pact":
            self.activation_clip_value = nn.Parameter(torch.tensor([10.0], **dev))
        # A quantizer that is off (32 bits) keeps its parameters (the reference checkpoints
        # have them) frozen, so DDP does not wait for gradients that never come.
        for name in ("weight_clip_value", "weight_scale") if bits_weights == 32 else ():
            if hasattr(self, name):
                getattr(self, name).requires_grad_(False)
        for name in ("activation_clip_value", "activation_scale", "activation_zero_point") if bits_activations == 32 else ():
            if isinstance(getattr(self, name, None), nn.Parameter):
                getattr(self, name).requires_grad_(False)
        # Data-driven init runs on the first forward unless a state dict provided the values.
        self.quant_initialized = False
        self._register_load_state_dict_pre_hook(_mark_initialized, with_module=True)
        self.clear_saq_state()

    # ---------------------------------------------------------------- SAQ hooks (used by saq.SAQ)
    def clear_saq_state(self) -> None:
        """Drop any perturbation and captured gradients."""
        self._saq_e: Optional[Tensor] = None
        self._saq_s: Optional[Tensor] = None
        self._saq_before = False
        self._saq_capture = False
        self._saq_probe: Optional[Tensor] = None
        self._saq_one: Optional[Tensor] = None

    def set_perturbation(self, e: Optional[Tensor], s: Optional[Tensor], before: bool) -> None:
        """Use ``Q(w) + s*e`` (``before=False``) or ``Q(w + s*e)`` as the weight until cleared."""
        self._saq_e, self._saq_s, self._saq_before = e, s, before

    @property
    def captured_grad(self) -> Optional[Tensor]:
        """dL/dQ(w) accumulated since the capture started (None if no pass ran)."""
        return None if self._saq_probe is None else self._saq_probe.grad

    def clear_captured_grad(self) -> None:
        if self._saq_probe is not None:
            self._saq_probe.grad = None

    def _probe(self):
        w = self.weight
        p = self._saq_probe
        if p is None or p.shape != w.shape or p.dtype != w.dtype or p.device != w.device:
            self._saq_probe = torch.zeros_like(w, requires_grad=True)
            self._saq_one = torch.ones((), dtype=torch.float32, device=w.device)
        return self._saq_probe, self._saq_one

    # ---------------------------------------------------------------- quantizers
    @property
    def weight_quantized(self) -> bool:
        return self.bits_weights != 32

    def _lsq_range(self, bits: int, signed: bool):
        if signed:
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return 0, 2**bits - 1

    def quantize_weight(
        self, e: Optional[Tensor] = None, s: Optional[Tensor] = None, before: bool = False
    ) -> Tensor:
        """The fake-quantized weight ``Q(w)`` (optionally perturbed), shaped like ``weight``."""
        w, b = self.weight, self.bits_weights
        if b == 32:
            return w if e is None else w + (s * e).to(w.dtype)
        q = self.quantizer
        if q == "liq":
            std = self.standardize and isinstance(self, nn.Conv2d)
            return sk.liq_quantize(w, self.weight_clip_value, b, True, std, e, s, before)
        if q in ("lsq", "lsq+"):
            qmin, qmax = self._lsq_range(b, True)
            per = w.numel() // self.weight_scale.numel()
            gf = 1.0 / math.sqrt(per * qmax)
            axis = 0 if self.per_channel else None
            return sk.fake_quantize(w, self.weight_scale.abs(), self.weight_zero_point, qmin, qmax, axis, gf, e, s, before)
        return dorefa_weight(w, b, e, s, before)

    @property
    def relu_foldable(self) -> bool:
        """The input quantizer computes ``Q(relu(x))`` from x at no extra cost, so ``input_relu``
        saves the ReLU's passes (saq/nn/relu_fold.py): unsigned LIQ (its clamp at 0 is the ReLU),
        LSQ / LSQ+ (``fake_quantize(relu=True)``, any range and zero point) and PACT (which
        applies a ReLU itself). Not DoReFa: its clamp passes the gradient at x = 0."""
        if self.bits_activations == 32:
            return False
        if self.quantizer == "liq":
            return not self.signed_activations
        return self.quantizer in ("lsq", "lsq+", "pact")

    def quantize_input(self, x: Tensor) -> Tensor:
        """The fake-quantized layer input (identity when ``bits_activations == 32``), of
        ``relu(x)`` when ``input_relu`` (folded into the quantizer where ``relu_foldable``, else
        applied first)."""
        b = self.bits_activations
        q = self.quantizer
        fold = self.input_relu and self.relu_foldable
        if self.input_relu and not fold:
            x = torch.relu(x)
        if b == 32:
            return x
        if q == "liq":
            return sk.liq_quantize(x, self.activation_clip_value, b, self.signed_activations, False,
                                   relu=fold)
        if q in ("lsq", "lsq+"):
            qmin, qmax = self._lsq_range(b, self.signed_activations)
            gf = 1.0 / math.sqrt(x[0].numel() * qmax) if x.dim() > 1 else 1.0 / math.sqrt(x.numel() * qmax)
            # |scale|, as LIQ's |clip|: a SAM ascent (or a large step) that pushes a small LSQ+
            # scale through 0 must not stop training (the op refuses scale <= 0); for a positive
            # scale the values and gradients are the same
            return sk.fake_quantize(x, self.activation_scale.abs(), self.activation_zero_point, qmin, qmax,
                                    None, gf, relu=fold)
        if q == "pact":  # relu(relu(x)) = relu(x), gradients included: the fold is PACT itself
            return pact_activation(x, self.activation_clip_value, b)
        return dorefa_activation(x, b)

    def _weight_for_forward(self) -> Tensor:
        if self._saq_capture and self._saq_e is None and torch.is_grad_enabled():
            probe, one = self._probe()
            return self.quantize_weight(probe, one, False)
        return self.quantize_weight(self._saq_e, self._saq_s, self._saq_before)

    # ---------------------------------------------------------------- initialization
    @torch.no_grad()
    def _init_from_data(self, x: Tensor) -> None:
        """First-batch initialization (see the module docstring); runs once."""
        self.quant_initialized = True
        q, w = self.quantizer, self.weight.detach()
        if q == "liq" and not isinstance(self, nn.Conv2d):
            # (floored as LSQ's scales are: an all-zero weight or first batch would give a zero
            # clip, which the quantizer refuses)
            self.weight_clip_value.copy_((w.abs().max() * 0.8).clamp_min(1e-8).reshape(1))
            self.activation_clip_value.copy_((x.detach().abs().max().float() * 0.8).clamp_min(1e-8).reshape(1))
        elif q in ("lsq", "lsq+"):
            _, qmax_w = self._lsq_range(max(self.bits_weights, 2), True)
            if self.per_channel:
                m = w.abs().flatten(1).mean(1)
            else:
                m = w.abs().mean().reshape(1)
            self.weight_scale.copy_((2 * m / math.sqrt(qmax_w)).clamp_min(1e-8))
            xd = x.detach().float()
            bits_a = max(self.bits_activations, 2)
            if q == "lsq+":
                lo, hi = xd.min(), xd.max()
                s = ((hi - lo) / (2**bits_a - 1)).clamp_min(1e-8)
                self.activation_scale.copy_(s.reshape(1))
                self.activation_zero_point.copy_((-lo / s).reshape(1))
            else:
                _, qmax_a = self._lsq_range(bits_a, self.signed_activations)
                self.activation_scale.copy_((2 * xd.abs().mean() / math.sqrt(qmax_a)).clamp_min(1e-8).reshape(1))
        elif q == "pact":
            self.activation_clip_value.copy_((x.detach().abs().max().float().clamp_min(1e-3) * 0.8).reshape(1))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + INIT_KEY] = torch.tensor(bool(self.quant_initialized))
        destination[prefix + BITS_KEY] = torch.tensor([self.bits_weights, self.bits_activations])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A state dict of other bits (same shapes) is refused before anything of this layer loads
        # (its pre-hooks included), as torch leaves a tensor of another shape untouched; the error
        # is collected and raised by load_state_dict at the end, strict or not.
        msg = _saved_bits_error(self, state_dict.pop(prefix + BITS_KEY, None), prefix)
        if msg is not None:
            error_msgs.append(msg)
            # children load after this returns (a weight_norm / parametrize weight lives in one):
            # their entries go too, so nothing under this layer loads
            for key in [k for k in state_dict if k.startswith(prefix)]:
                del state_dict[key]
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _maybe_init(self, x: Tensor) -> None:
        # on the first forward in any mode, as the reference code does: an evaluation before
        # training would otherwise run the placeholders (an LSQ scale of 1 zeroes every weight)
        if not self.quant_initialized:
            self._init_from_data(torch.relu(x) if self.input_relu else x)

    def quant_repr(self) -> str:
        return (
            f"bits_weights={self.bits_weights}, bits_activations={self.bits_activations}, "
            f"quantizer={self.quantizer}" + (", per_channel=True" if self.per_channel else "")
            + (", input_relu=True" if self.input_relu else "")
        )


def _mark_initialized(module, state_dict, prefix, *args, **kwargs):
    # Our state dicts say whether the data-driven init has run ("<prefix>quant_initialized", a
    # bool tensor written by _save_to_state_dict), so one saved before the first training batch
    # keeps its placeholders *and* its pending init. The entry is taken out here (it is not a
    # buffer: no device moves, no DDP broadcast, no host read in forward), so strict loading
    # does not call it unexpected. A state dict without it (the reference code's, or one saved
    # before saq wrote it) that carries quantizer parameters was trained: do not overwrite them
    # with first-batch statistics.
    flag = state_dict.pop(prefix + INIT_KEY, None)
    if flag is not None:
        if not (isinstance(flag, Tensor) and flag.numel() == 1):
            raise ValueError(
                f"{type(module).__name__}.load_state_dict: {prefix + INIT_KEY!r} must be the "
                f"one-element tensor state_dict() writes, got {flag!r}")
        if not flag.is_meta:  # a load onto the meta device has no value to read
            module.quant_initialized = bool(flag.item())
        return
    if any(prefix + k in state_dict for k in
           ("weight_clip_value", "activation_clip_value", "weight_scale", "activation_scale")):
        module.quant_initialized = True


def _saved_bits_error(module, saved, prefix: str) -> Optional[str]:
    """Why a state dict's "<prefix>quant_bits" ([bits_weights, bits_activations], written by
    _save_to_state_dict) does not fit ``module`` (None: it fits, or is absent, as in the
    reference's and older saq dicts). Without it a 4-bit checkpoint loaded into an 8-bit layer
    silently: the clips / scales have the same shapes at every bit width."""
    if saved is None:
        return None
    name = f"{type(module).__name__}.load_state_dict: {prefix + BITS_KEY!r}"
    ok = (isinstance(saved, Tensor) and saved.dim() == 1 and saved.numel() == 2
          and saved.dtype != torch.bool and not saved.is_complex())
    if ok and saved.is_meta:
        return None  # a load onto the meta device: no values to compare
    # whole numbers of any real dtype (a checkpoint averaged in floating point keeps 4.0)
    values = saved.tolist() if ok else []
    if not (ok and all(math.isfinite(v) and float(v).is_integer() for v in values)):
        return f"{name} must be the two whole numbers state_dict() writes, got {saved!r}"
    bw, ba = (int(v) for v in values)
    if (bw, ba) == (module.bits_weights, module.bits_activations):
        return None
    return (f"{name}: the state dict was saved from a layer with bits_weights={bw}, "
            f"bits_activations={ba}, but this one has bits_weights={module.bits_weights}, "
            f"bits_activations={module.bits_activations}; build the model with the bits it was "
            "saved with (quantize_model's weight_bits / act_bits / first_last_bits) or load only "
            "the float weights")


class QConv2d(QuantLayer, nn.Conv2d):
    """nn.Conv2d with fake-quantized weight and input: ``conv2d(Q_a(x), Q_w(W), bias)``.

    Args: those of nn.Conv2d, plus ``bits_weights``, ``bits_activations`` (2..8 or 32),
    ``quantizer`` (see module docstring), ``per_channel`` (LSQ only: one scale per output
    channel), ``standardize`` (LIQ weight standardization, default True as in the reference),
    ``signed_activations`` (quantize inputs with a signed range; default unsigned).
    Input [N, C_in, H, W] -> output [N, C_out, H', W'].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        bits_weights: int = 32,
        bits_activations: int = 32,
        quantizer: str = "liq",
        per_channel: bool = False,
        standardize: bool = True,
        signed_activations: bool = False,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ):
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device=device, dtype=dtype,
        )
        self._setup_quant(bits_weights, bits_activations, quantizer, per_channel, standardize, signed_activations)

    def forward(self, x: Tensor) -> Tensor:
        self._maybe_init(x)
        return self._conv_forward(self.quantize_input(x), self._weight_for_forward(), self.bias)

    def extra_repr(self) -> str:
        return nn.Conv2d.extra_repr(self) + ", " + self.quant_repr()


class QLinear(QuantLayer, nn.Linear):
    """nn.Linear with fake-quantized weight and input: ``linear(Q_a(x), Q_w(W), bias)``.

    Same quantizer arguments as :class:`QConv2d` (linear weights are never standardized).
    Input [..., in_features] -> output [..., out_features].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits_weights: int = 32,
        bits_activations: int = 32,
        quantizer: str = "liq",
        per_channel: bool = False,
        standardize: bool = False,
        signed_activations: bool = False,
        device=None,
        dtype=None,
    ):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_quant(bits_weights, bits_activations, quantizer, per_channel, standardize, signed_activations)

    def forward(self, x: Tensor) -> Tensor:
        self._maybe_init(x)
        return F.linear(self.quantize_input(x), self._weight_for_forward(), self.bias)

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + ", " + self.quant_repr()
