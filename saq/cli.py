"""Command line: ``saq train``, ``saq eval``, ``saq presets`` (also ``python -m saq ...``).

    saq train                                   # W4A4 SAQ (LIQ) on digits, < 1 min on 2 CPU cores
    saq train --method qat --out runs/qat       # plain QAT baseline
    saq train --preset cifar100-resnet20-w4a4 --data-root ~/data --pretrained fp.pt
    torchrun --nproc_per_node 4 -m saq train --preset imagenet-resnet18-w4a4 --data-root /imagenet
    saq train --resume auto --out runs/x        # continue runs/x/last.pt (or start it)
    saq eval --checkpoint runs/x/best.pt

Option precedence: built-in defaults < dataset defaults < --preset < explicit flags. Errors the
user can fix (missing data folder, bad checkpoint, inconsistent options) print one line and exit
with code 2; unknown names are rejected by argparse (also code 2).
"""
import argparse
import json
import os
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]


def _int_list(s: str):
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 80,120, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the three subcommands. Train options default to SUPPRESS so that
    the namespace holds exactly the flags given (presets and resume must not override them)."""
    from saq.models import MODEL_NAMES
    from saq.train.config import (BIT_CHOICES, DATASET_DEFAULTS, DATASETS, METHODS, PRESETS,
                                  QUANTIZERS, TrainConfig)

    d = TrainConfig()
    dg = DATASET_DEFAULTS["digits"]
    p = argparse.ArgumentParser(prog="saq", description="Sharpness-aware quantization-aware "
                                "training (SAQ) for PyTorch.")
    sub = p.add_subparsers(dest="command", metavar="{train,eval,analyze,presets}")
    sub.required = True

    t = sub.add_parser("train", help="train (or resume) a run",
                       argument_default=argparse.SUPPRESS,
                       description="Train a quantized model with SAQ, SAM or plain QAT. Defaults "
                       "in brackets; 'dataset' means the per-dataset default (digits values "
                       "shown).")
    a = t.add_argument_group("data")
    a.add_argument("--dataset", choices=DATASETS, help=f"[{d.dataset}]")
    a.add_argument("--data-root", metavar="DIR", help="dataset folder (cifar*, imagefolder)")
    a.add_argument("--workers", type=int, metavar="N",
                   help=f"loader worker processes [{d.workers}]")
    a.add_argument("--batch-size", type=int, metavar="N",
                   help=f"total batch over all processes [dataset: {dg['batch_size']}]")
    a = t.add_argument_group("model and quantization")
    a.add_argument("--model", choices=MODEL_NAMES, help=f"[dataset: {dg['model']}]")
    a.add_argument("--wbits", type=int, choices=BIT_CHOICES, help=f"weight bits, 32 = float "
                   f"[{d.wbits}]")
    a.add_argument("--abits", type=int, choices=BIT_CHOICES, help=f"activation bits [{d.abits}]")
    a.add_argument("--quantizer", choices=QUANTIZERS, help=f"[{d.quantizer}]")
    a.add_argument("--per-channel", action="store_true", help="per-channel weight scales (lsq)")
    a.add_argument("--first-last-bits", type=int, choices=BIT_CHOICES,
                   help="bits of the first conv's weights and the last linear "
                   f"[{d.first_last_bits}]")
    a.add_argument("--pretrained", metavar="PATH", help="full-precision state_dict loaded into "
                   "the float model before quantization")
    a = t.add_argument_group("method")
    a.add_argument("--method", choices=METHODS, help=f"[{d.method}]")
    a.add_argument("--case", type=int, choices=(1, 2, 3), help=f"SAQ case [{d.case}]")
    a.add_argument("--adaptive", action="store_true", help="ASAM-style adaptive perturbation")
    a.add_argument("--rho", type=float, help=f"neighbourhood radius [dataset: {dg['rho']}; "
                   f"cifar 0.4, imagefolder 0.3]")
    a.add_argument("--eta", type=float, help=f"adaptive eta [{d.eta}]")
    a.add_argument("--ascent-every", type=int, metavar="K", help="efficient mode: a full ascent "
                   f"every K steps, the last perturbation reused in between [{d.ascent_every}]")
    a.add_argument("--sync-ascent", action="store_true", help="under DDP, all-reduce pass 1's "
                   "gradients too (the reference code perturbs with each replica's own)")
    a = t.add_argument_group("optimization")
    a.add_argument("--epochs", type=int, help=f"[dataset: {dg['epochs']}]")
    a.add_argument("--lr", type=float, help=f"[dataset: {dg['lr']}]")
    a.add_argument("--clip-lr", type=float, help="lr of quantizer clips/scales [= --lr]")
    a.add_argument("--momentum", type=float, help=f"[{d.momentum}]")
    a.add_argument("--no-nesterov", dest="nesterov", action="store_false",
                   help="plain momentum instead of Nesterov")
    a.add_argument("--weight-decay", type=float, help=f"[dataset: {dg['weight_decay']}]")
    a.add_argument("--optimizer", choices=("sgd", "adamw"), help=f"[{d.optimizer}]")
    a.add_argument("--scheduler", choices=("cosine", "step"), help=f"[dataset: {dg['scheduler']}]")
    a.add_argument("--milestones", type=_int_list, metavar="E1,E2",
                   help="step decay epochs [cifar 80,120; else 40%%,60%% of --epochs]")
    a.add_argument("--gamma", type=float, help=f"step decay factor [{d.gamma}]")
    a.add_argument("--warmup-epochs", type=float, help=f"linear lr warmup [{d.warmup_epochs}]")
    a = t.add_argument_group("run")
    a.add_argument("--preset", choices=tuple(PRESETS), help="a published recipe (saq presets)")
    a.add_argument("--out", metavar="DIR", help="run folder [runs/<dataset>-<model>-<method>-"
                   "w<wb>a<ab>-<timestamp>]")
    a.add_argument("--resume", metavar="PATH|auto", help="continue from a checkpoint; auto = "
                   "<out>/last.pt if it exists")
    a.add_argument("--overwrite", action="store_true", help="start a fresh run in an --out that "
                   "already holds one (its checkpoints and metrics are replaced)")
    a.add_argument("--device", help=f"auto, cpu, cuda or cuda:N [{d.device}]")
    a.add_argument("--malloc-keep", choices=("auto", "on", "off"),
                   help="keep freed CPU blocks up to 256 MiB for reuse instead of returning them "
                        "to the OS (glibc; saves the page faults of large activations); auto = on "
                        f"when training on the CPU [{d.malloc_keep}]")
    a.add_argument("--seed", type=int, help=f"[{d.seed}]")
    a.add_argument("--amp", choices=("none", "bf16", "fp16"), help=f"autocast dtype [{d.amp}]")
    a.add_argument("--compile", action="store_true", help="torch.compile the model")
    a.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True)")
    a.add_argument("--log-every", type=int, metavar="N", help=f"show the loss every N steps "
                   f"[{d.log_every}]; 0 = never")
    a.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (also off when stderr is not a terminal)")
    a.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps in "
                   "all (smoke tests); the lr schedule still spans --epochs")

    e = sub.add_parser("eval", help="evaluate a checkpoint on the test split")
    e.add_argument("--checkpoint", required=True, metavar="PATH")
    e.add_argument("--dataset", choices=DATASETS, help="[the checkpoint's]")
    e.add_argument("--data-root", metavar="DIR", help="[the checkpoint's]")
    e.add_argument("--batch-size", type=int, metavar="N", help="[the checkpoint's]")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    e.add_argument("--workers", type=int, default=0, metavar="N")
    e.add_argument("--amp", choices=("none", "bf16", "fp16"), help="[the checkpoint's]")
    e.add_argument("--json", action="store_true", help="print the result as one JSON line")

    s = sub.add_parser("analyze", help="sharpness of a checkpoint, optionally its loss along a random direction",
                       description="The SAM sharpness L(Q(w) + e) - L(Q(w)) of a checkpoint at radius rho "
                                   "(e: the ascent of saq.SAQ, evaluated without a step) on fixed batches, "
                                   "in eval mode; with --landscape N, the loss at Q(w) + alpha * d along a "
                                   "random filter-normalized direction d, alpha in [-span, span].")
    s.add_argument("--checkpoint", required=True, metavar="PATH")
    s.add_argument("--rho", type=float, help="radius [the run's rho; compare checkpoints at one rho]")
    s.add_argument("--case", type=int, choices=(1, 2, 3), default=3, help="SAQ case of the perturbation [3]")
    s.add_argument("--adaptive", action="store_true", help="ASAM-style adaptive perturbation")
    s.add_argument("--split", choices=("train", "test"), default="train",
                   help="data, without augmentation [train: the epoch-0 order of the run's seed]")
    s.add_argument("--batches", type=int, default=8, metavar="N", help="batches analysed [8]")
    s.add_argument("--batch-size", type=int, metavar="N", help="[the checkpoint's]")
    s.add_argument("--landscape", type=int, default=0, metavar="N",
                   help="points of the 1-D loss curve (0: none) [0]")
    s.add_argument("--span", type=float, default=1.0, help="alpha range of the curve [1.0]")
    s.add_argument("--seed", type=int, default=0, help="seed of the random direction [0]")
    s.add_argument("--plot", metavar="FILE.png", help="draw the curve there")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    s.add_argument("--workers", type=int, default=0, metavar="N")
    s.add_argument("--amp", choices=("none", "bf16"), default="none", help="autocast [none: fp32]")
    s.add_argument("--json", action="store_true", help="print the result as one JSON line")

    sub.add_parser("presets", help="list the training presets")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.command == "presets":
        from saq.train.config import preset_table

        print(preset_table())
        return 0
    if args.command == "eval":
        from saq.train.loop import evaluate_checkpoint

        r = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data_root=args.data_root,
                                batch_size=args.batch_size, device=args.device,
                                workers=args.workers, amp=args.amp)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{args.checkpoint} ({r['model']}, epoch {r['epoch']}, step "
                  f"{r['global_step']}) on {r['dataset']} test ({r['samples']} images): "
                  f"top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['test_loss']:.4f}")
        return 0
    if args.command == "analyze":
        from saq.analysis import analyze_checkpoint

        r = analyze_checkpoint(args.checkpoint, rho=args.rho, case=args.case, adaptive=args.adaptive,
                               split=args.split, batches=args.batches, batch_size=args.batch_size,
                               landscape=args.landscape, span=args.span, seed=args.seed,
                               plot=args.plot, device=args.device, workers=args.workers, amp=args.amp)
        if args.json:
            print(json.dumps(r))
            return 0
        print(f"{args.checkpoint} ({r['model']} w{r['wbits']}a{r['abits']} {r['method']}, epoch "
              f"{r['epoch']}) on {r['dataset']} {r['split']} ({r['batches']} batches, {r['samples']} "
              f"images), case {r['case']}{' adaptive' if r['adaptive'] else ''}, rho {r['rho']:g}: "
              f"loss {r['loss']:.4f}  perturbed {r['perturbed_loss']:.4f}  sharpness {r['sharpness']:.4f}")
        if r["nonfinite_batches"]:
            print(f"  {r['nonfinite_batches']} batch(es) had non-finite gradients (no perturbation)")
        if "landscape" in r:
            pts = "  ".join(f"{a:+.2f}: {l:.4f}" for a, l in zip(r["landscape"]["alpha"], r["landscape"]["loss"]))
            print(f"  loss along a random filter-normalized direction (seed {args.seed}): {pts}")
            if "plot" in r:
                print(f"  plot: {r['plot']}")
        return 0
    from saq.train.loop import build_config, train

    explicit = {k: v for k, v in vars(args).items() if k != "command"}
    train(build_config(explicit))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``saq`` / ``python -m saq``; returns the exit code.

    0 on success; 2 for usage errors (argparse) and for errors the user can fix, which are
    printed as one line ("saq <command>: error: ...") without a traceback.
    """
    from saq.data import DataError
    from saq.train.checkpoint import CheckpointError
    from saq.train.config import ConfigError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return int(e.code or 0)
    try:
        return _run(args)
    except (FileNotFoundError, NotADirectoryError, ConfigError, CheckpointError, DataError) as e:
        msg = str(e).strip().replace("\n", " ")
        # under torchrun the ranks of a node usually meet the same error: one line per node
        # (a node-local cause, such as a missing data folder, still shows on its node)
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"saq {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except ImportError as e:
        if "pip install" not in str(e):  # a deliberate, actionable message; else a real bug
            raise
        print(f"saq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"saq {args.command}: interrupted", file=sys.stderr)
        return 130
