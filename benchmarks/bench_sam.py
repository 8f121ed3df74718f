"""The SAM multi-tensor ops over the parameter lists of real models.

Ops: ``grad_sq_norm``, ``sam_perturb_``, ``sam_restore_``, ``sam_restore_sgd_`` (momentum 0.9,
Nesterov, weight decay 1e-4: the SAQ recipe) and ``sam_restore_adamw_`` (betas 0.9/0.999, weight
decay 1e-2), over every parameter of preact_resnet20 / resnet18 / resnet50 / ViT-B/16 (shapes from
``saq.models`` built on the meta device), in the parameters' dtype.

Providers: each saq backend (``use_backend(name)``); ``reference-eager`` and ``reference-compile``
(``saq_kernels.reference`` directly / through ``torch.compile``); ``loop``: the per-parameter code
a user writes (SAM reference code: per-tensor norms then a norm of the stack; ``old = p.clone()``
and ``p.add_(g * scale)``; restore by ``p.copy_(old)``; torch.optim.SGD / AdamW with
``foreach=False``); ``foreach``: the same with ``torch._foreach_*`` ops and the optimizers'
``foreach=True``; ``torch-fused``: the restore as ``_foreach_copy_`` then SGD / AdamW with
``fused=True``. The saq restore+step ops get a ``found_inf`` tensor (their skip-on-overflow check
is part of the op).

Bytes moved (the floor; s = bytes per element of the parameters' dtype, N = parameter count;
the per-step scalars are negligible):
    grad_sq_norm        read g                                   1 s N
    sam_perturb_        read p, g; write backup, p               4 s N
    sam_restore_        read backup; write p                     2 s N
    sam_restore_sgd_    read backup, g, buf; write buf, p        5 s N
    sam_restore_adamw_  read backup, g, m, v; write m, v, p      7 s N
"""
from __future__ import annotations

import pytest
import torch

import harness as H
from harness import CFG, DTYPES

OPS = {"grad_sq_norm": 1, "sam_perturb_": 4, "sam_restore_": 2, "sam_restore_sgd_": 5,
       "sam_restore_adamw_": 7}
BASELINES = ["loop", "foreach", "torch-fused", "reference-eager", "reference-compile"]
LR, MOMENTUM, WD_SGD, WD_ADAMW = 0.01, 0.9, 1e-4, 1e-2
BETAS, EPS = (0.9, 0.999), 1e-8
_SHAPES: dict = {}


# At most this many rotated states: each is a distinct tensor list, hence a distinct entry of the
# Triton SAM ops' table cache (saq_kernels/_triton/sam.py, 32 entries); a training step reuses
# its one list, so more states than the cache holds would time table rebuilds no step pays.
_MAX_STATES = 16


def _param_shapes(model: str):
    """Parameter shapes of ``model`` from saq.models, built on the meta device (no memory)."""
    if model not in _SHAPES:
        try:
            from saq.models import get_model
        except Exception as exc:  # the training package is being written alongside
            return f"saq.models is not importable: {type(exc).__name__}: {exc}"
        kw = {}
        name, classes = model, 1000
        if model == "preact_resnet20":
            classes = 100
        if model == "vit_b":  # ViT-B/16 through the vit_tiny constructor
            name, kw = "vit_tiny", dict(dim=768, depth=12, num_heads=12, img_size=224, patch_size=16)
        with torch.device("meta"):
            m = get_model(name, classes, **kw)
        _SHAPES[model] = [tuple(p.shape) for p in m.parameters()]
    return _SHAPES[model]


def _providers():
    return H.saq_backends() + [(p, None) for p in BASELINES]


def _params():
    out = []
    # model first (the target's, ResNet-50, leads on a GPU), then dtype: a time budget cuts the
    # small models, not a dtype
    for model in CFG.sam_models:
        for dtype in CFG.dtypes:
            for op in OPS:
                for provider, reason in _providers():
                    if not CFG.want(provider):
                        continue
                    if provider == "torch-fused" and op not in ("sam_restore_sgd_", "sam_restore_adamw_"):
                        continue
                    marks = [pytest.mark.skip(reason=reason)] if reason else []
                    out.append(pytest.param(op, provider, model, dtype, marks=marks,
                                            id=H.case_id(op, provider, model, dtype)))
    return out


def _make_state(shapes, dt):
    """One independent set of parameter-shaped lists (random, never zeros)."""
    dev = CFG.device
    gen = torch.Generator(device=dev).manual_seed(7)
    rnd = lambda shp, scale=1.0: (torch.randn(shp, generator=gen, device=dev) * scale).to(dt)
    params = [rnd(s, 0.05) for s in shapes]
    return dict(
        params=params,
        grads=[rnd(s, 1e-3) for s in shapes],
        backups=[p.clone() for p in params],
        bufs=[rnd(s, 1e-3) for s in shapes],
        exp_avgs=[rnd(s, 1e-3) for s in shapes],
        exp_avg_sqs=[rnd(s, 1e-3).abs_() for s in shapes],
        steps=[torch.tensor(10.0, device=dev) for _ in shapes],
    )


def _torch_optimizer(op, st, impl):
    """torch.optim.SGD / AdamW over the state's params (grads attached), impl: foreach|fused|loop."""
    params = st["params"]
    for p, g in zip(params, st["grads"]):
        p.grad = g
    flag = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "torch-fused": dict(fused=True)}[impl]
    if op == "sam_restore_sgd_":
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WD_SGD, **flag)
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD_ADAMW, **flag)


def _call(op, provider, st, scale, lr, found_inf):
    import saq_kernels as sk
    from saq_kernels import reference as R

    P, G, B = st["params"], st["grads"], st["backups"]
    n = len(P)
    flags = [False] * n
    if provider.startswith("saq-") or provider.startswith("reference-"):
        if provider.startswith("saq-"):
            fns = dict(
                grad_sq_norm=lambda: sk.grad_sq_norm(G),
                sam_perturb_=lambda: sk.sam_perturb_(P, G, B, scale),
                sam_restore_=lambda: sk.sam_restore_(P, B),
                sam_restore_sgd_=lambda: sk.sam_restore_sgd_(
                    P, B, G, st["bufs"], lr, MOMENTUM, 0.0, WD_SGD, True, False, found_inf),
                sam_restore_adamw_=lambda: sk.sam_restore_adamw_(
                    P, B, G, st["exp_avgs"], st["exp_avg_sqs"], st["steps"], lr, BETAS[0], BETAS[1],
                    EPS, WD_ADAMW, found_inf),
            )
            return fns[op]
        fn = getattr(R, op)
        if provider == "reference-compile":
            fn = H.compiled(fn)
        args = dict(
            grad_sq_norm=(G, G, flags, 0.01),
            sam_perturb_=(P, G, B, scale, flags),
            sam_restore_=(P, B),
            sam_restore_sgd_=(P, B, G, st["bufs"], lr, MOMENTUM, 0.0, WD_SGD, True, False, found_inf),
            sam_restore_adamw_=(P, B, G, st["exp_avgs"], st["exp_avg_sqs"], st["steps"], lr, BETAS[0],
                                BETAS[1], EPS, WD_ADAMW, found_inf),
        )[op]
        return lambda: fn(*args)

    if op == "grad_sq_norm":
        if provider == "loop":
            return lambda: torch.norm(torch.stack([g.norm(p=2) for g in G]), p=2)
        return lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(G)))
    if op == "sam_perturb_":
        if provider == "loop":
            state = {}

            def perturb_loop():
                for i, (p, g) in enumerate(zip(P, G)):
                    state[i] = p.clone()
                    p.add_(g * scale.to(p))

            return perturb_loop

        def perturb_foreach():
            torch._foreach_copy_(B, P)
            torch._foreach_add_(P, torch._foreach_mul(G, scale.to(P[0].dtype)))

        return perturb_foreach
    if op == "sam_restore_":
        if provider == "loop":
            def restore_loop():
                for p, b in zip(P, B):
                    p.copy_(b)

            return restore_loop
        return lambda: torch._foreach_copy_(P, B)

    opt = _torch_optimizer(op, st, provider)
    if provider == "loop":
        def restore_step_loop():
            for p, b in zip(P, B):
                p.copy_(b)
            opt.step()

        return restore_step_loop

    def restore_step_foreach():
        torch._foreach_copy_(P, B)
        opt.step()

    return restore_step_foreach


@pytest.mark.parametrize("op,provider,model,dtype", _params())
def test_sam(benchmark, op, provider, model, dtype):
    dt = DTYPES[dtype]
    if provider.startswith("saq-"):
        reason = H.backend_reason(provider, op, dt)
        if reason:
            pytest.skip(reason)
    tag = f"{op}/{model}/{dtype}"
    if provider == "reference-compile":
        reason = H.compile_skip(tag)
        if reason is None and CFG.suite != "full":
            reason = ("torch.compile of a whole parameter list takes 5-15 s per graph (one per op, "
                      "model and dtype): only the full suite runs it")
        if reason:
            pytest.skip(reason)
    shapes = _param_shapes(model)
    if isinstance(shapes, str):
        pytest.skip(shapes)
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    nbytes = OPS[op] * dt.itemsize * numel
    scale = torch.tensor(1e-3, device=CFG.device)
    lr = torch.tensor(LR, device=CFG.device)
    found_inf = torch.zeros((), device=CFG.device)

    def setup(k):
        # mutating ops: every rotated set is a fresh state (optimizers included); the first is cached
        sets = H.rotated(("sam", model, dtype), 1, lambda: (_make_state(shapes, dt),))
        states = [sets[0][0]] + [_make_state(shapes, dt) for _ in range(k - 1)]
        return [_call(op, provider, st, scale, lr, found_inf) for st in states]

    H.run_case(benchmark, op=op, provider=provider, mode="update", shape=model, numel=numel,
               dtype=dtype, nbytes=nbytes, setup=setup, context=lambda: H.backend_context(provider),
               tolerate=not provider.startswith("saq-"), note=f"{len(shapes)} tensors",
               compile_tag=tag if provider == "reference-compile" else None,
               max_rotation=_MAX_STATES)
