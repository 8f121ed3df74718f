"""The measured default backend order: benchmarks/choose_defaults.py ranks the recorded rows, writes
saq_kernels/backends/measured_order.py, and the registry follows it per device type, op and dtype."""
import csv
from pathlib import Path

import pytest
import torch
from bit_utils import load_script

from saq_kernels import backends
from saq_kernels.backends import measured_order

ROOT = Path(__file__).resolve().parents[2]
cd = load_script(ROOT / "benchmarks" / "choose_defaults.py")


def row(op, provider, mode, shape, dtype, ms):
    return {"op": op, "provider": provider, "mode": mode, "shape": shape, "dtype": dtype, "median_ms": str(ms)}


def quant_rows(times, op="fake_quantize", mode="fwd+bwd", dtype="fp32"):
    """times: provider -> {shape: ms}"""
    return [row(op, p, mode, s, dtype, ms) for p, per in times.items() for s, ms in per.items()]


@pytest.fixture
def fresh_orders(monkeypatch):
    """Isolate the registry's order state (default orders, user flag, cache) for one test."""
    monkeypatch.setattr(backends, "_DEFAULT_ORDER", {k: list(v) for k, v in backends._DEFAULT_ORDER.items()})
    monkeypatch.setattr(backends, "_USER_ORDER", set())
    monkeypatch.setattr(backends, "_ORDER_CACHE", {})
    return monkeypatch


# ----------------------------------------------------------------------------------------------
# ranking
# ----------------------------------------------------------------------------------------------
def test_rank_orders_by_geometric_mean_of_ratio_to_fastest():
    rows = quant_rows({
        "saq-triton": {"a": 1.0, "b": 4.0},  # ratios 1.0, 2.0 -> geo 1.414
        "saq-cuda": {"a": 2.0, "b": 2.0},  # ratios 2.0, 1.0 -> geo 1.414, preferred on the tie
        "saq-reference": {"a": 8.0, "b": 8.0},
    })
    rk = cd.rank(rows, "fake_quantize", "fp32", ("fwd+bwd",))
    assert rk.order == ["cuda", "triton", "reference"]
    assert rk.geo["cuda"] == pytest.approx(2 ** 0.5)
    assert rk.geo["reference"] == pytest.approx(8 / 2 ** 0.5)
    assert rk.shapes == ["a", "b"]
    # triton wins shape a by 2x: reported, not hidden
    assert rk.split == {"a": "triton"}


def test_rank_tie_margin_and_strict_winner():
    rows = quant_rows({"saq-triton": {"a": 1.00}, "saq-cuda": {"a": 1.015}})
    assert cd.rank(rows, "fake_quantize", "fp32", ("fwd+bwd",)).order == ["cuda", "triton"]  # within 2 %
    assert cd.rank(rows, "fake_quantize", "fp32", ("fwd+bwd",), tie=0.01).order == ["triton", "cuda"]
    rows = quant_rows({"saq-triton": {"a": 1.0}, "saq-cuda": {"a": 1.1}})
    assert cd.rank(rows, "fake_quantize", "fp32", ("fwd+bwd",)).order == ["triton", "cuda"]


def test_rank_uses_only_shapes_every_candidate_has_and_ignores_other_providers():
    rows = quant_rows({
        "saq-cpp": {"a": 1.0, "big": 100.0},  # "big" was not measured for the reference
        "saq-reference": {"a": 2.0},
        "torch-learnable": {"a": 0.1, "big": 0.1},  # not a saq backend
        "saq-default": {"a": 0.1},  # the registry's own pick, not a candidate
    })
    rk = cd.rank(rows, "fake_quantize", "fp32", ("fwd+bwd",))
    assert rk.order == ["cpp", "reference"] and rk.shapes == ["a"]


def test_rank_exclude_dtype_and_empty():
    rows = quant_rows({"saq-triton": {"a": 1.0}, "saq-cuda": {"a": 3.0}})
    assert cd.rank(rows, "fake_quantize", "fp32", ("fwd+bwd",), exclude=["triton"]).order == ["cuda"]
    assert cd.rank(rows, "fake_quantize", "bf16", ("fwd+bwd",)) is None
    assert cd.rank(rows, "liq_quantize", "fp32", ("fwd+bwd",)) is None
    # no shape in common: no ranking rather than a guess
    rows = quant_rows({"saq-triton": {"a": 1.0}, "saq-cuda": {"b": 3.0}})
    assert cd.rank(rows, "fake_quantize", "fp32", ("fwd+bwd",)) is None


def test_choose_pairs_quantizer_forward_and_backward_on_fwd_bwd_rows():
    rows = (quant_rows({"saq-triton": {"a": 1.0}, "saq-cuda": {"a": 2.0}}, mode="fwd+bwd")
            # forward alone favours cuda, but training runs both: the pair follows fwd+bwd
            + quant_rows({"saq-triton": {"a": 2.0}, "saq-cuda": {"a": 1.0}}, mode="fwd")
            + quant_rows({"saq-triton": {"a": 2.0}, "saq-cuda": {"a": 1.0}}, op="liq_quantize", mode="fwd")
            + quant_rows({"saq-triton": {"a": 1.0}, "saq-cuda": {"a": 2.0}}, op="liq_quantize", mode="bwd")
            + [row("sam_perturb_", "saq-cuda", "update", "resnet50", "fp32", 1.0),
               row("sam_perturb_", "saq-triton", "update", "resnet50", "fp32", 0.5)])
    got = cd.choose(rows)
    assert got["fake_quantize"]["fp32"].order == got["fake_quantize_backward"]["fp32"].order == ["triton", "cuda"]
    # without fwd+bwd rows, each op by its own rows
    assert got["liq_quantize"]["fp32"].order == ["cuda", "triton"]
    assert got["liq_quantize_backward"]["fp32"].order == ["triton", "cuda"]
    assert got["sam_perturb_"]["fp32"].order == ["triton", "cuda"]
    assert "grad_sq_norm" not in got


def test_fill_gives_unmeasured_ops_and_dtypes_a_measured_order_of_their_family():
    # a budget-cut GPU run: fp32 quantizer rows only, one SAM op; the train step's ops in bf16
    # and the other SAM ops must not fall back to the device's base order (that of a run with
    # no rows)
    rows = (quant_rows({"saq-triton": {"a": 1.0}, "saq-cuda": {"a": 2.0}})
            + [row("sam_perturb_", "saq-cuda", "update", "resnet50", "fp32", 1.0),
               row("sam_perturb_", "saq-triton", "update", "resnet50", "fp32", 2.0)])
    got = cd.choose(rows)
    assert "bf16" not in got["fake_quantize"] and "liq_quantize" not in got
    cd.fill_missing(got)
    assert got["fake_quantize"]["bf16"].order == ["triton", "cuda"]
    assert got["liq_quantize_backward"]["bf16"].order == ["triton", "cuda"]  # from its family
    assert got["liq_quantize"]["fp32"].filled_from == "fake_quantize/fp32"
    assert got["fake_quantize"]["fp32"].filled_from == ""  # measured ones untouched
    for op in cd.SAM_OPS:
        assert got[op]["fp32"].order == got[op]["bf16"].order == ["cuda", "triton"], op
    assert "no rows of its own" in got["sam_restore_sgd_"]["fp32"].comment()
    empty = {}
    cd.fill_missing(empty)
    assert empty == {}


def test_write_round_trip_keeps_other_device_types(tmp_path):
    module = tmp_path / "measured_order.py"
    gpu = tmp_path / "nvidia-h100-80gb-hbm3.csv"
    cpu = tmp_path / "cpu-some-cpu-2t.csv"
    for path, rows in ((gpu, quant_rows({"saq-triton": {"a": 1.0}, "saq-cuda": {"a": 2.0}})),
                       (cpu, quant_rows({"saq-cpp": {"a": 1.0}, "saq-reference": {"a": 9.0}}))):
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    assert cd.main([str(cpu), "--write", "--module", str(module)]) == 0
    assert cd.main([str(gpu), "--write", "--module", str(module)]) == 0
    orders, evidence, sources, excluded = cd.load_existing(module)
    assert orders["cpu"]["fake_quantize"]["fp32"] == ["cpp", "reference"]
    assert orders["cuda"]["fake_quantize_backward"]["fp32"] == ["triton", "cuda"]
    assert "cuda 2.00" in evidence["cuda"]["fake_quantize"]["fp32"]
    assert set(sources) == {"cpu", "cuda"}
    assert not any(excluded.values())
    # a rewrite with a backend excluded replaces that device type's entries only, and records
    # the exclusion, so the orders can be derived again from the same file
    assert cd.main([str(gpu), "--exclude", "triton", "--write", "--module", str(module)]) == 0
    orders2, _, _, excluded2 = cd.load_existing(module)
    assert orders2["cuda"]["fake_quantize"]["fp32"] == ["cuda"]
    assert orders2["cpu"] == orders["cpu"]
    assert excluded2.get("cuda") == ["triton"] and not excluded2.get("cpu")
    rederived = cd.choose(cd.read_rows([gpu]), excluded2["cuda"])
    assert {op: {dt: rk.order for dt, rk in per.items()} for op, per in rederived.items()} == orders2["cuda"]


def test_missing_file_is_an_error(tmp_path, capsys):
    assert cd.main([str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the committed module and the registry
# ----------------------------------------------------------------------------------------------
def test_committed_orders_match_the_committed_results():
    """measured_order.py is what choose_defaults.py derives from the result files it names."""
    for dev, src in measured_order.SOURCES.items():
        paths = [ROOT / p.strip() for p in src.split(",")]
        assert all(p.exists() for p in paths), f"{dev}: {src} is not in the repository"
        chosen = cd.choose(cd.read_rows(paths), getattr(measured_order, "EXCLUDED", {}).get(dev, []))
        got = {op: {dt: rk.order for dt, rk in per.items()} for op, per in chosen.items()}
        assert got == measured_order.MEASURED_ORDER[dev], (
            f"{dev}: rerun python benchmarks/choose_defaults.py {src} --write")


def test_committed_orders_name_known_ops_and_backends():
    known = set(backends.available_backends())
    for dev, per_op in measured_order.MEASURED_ORDER.items():
        for op, per_dtype in per_op.items():
            assert op in backends.OP_NAMES
            for dt, names in per_dtype.items():
                assert dt in ("fp32", "bf16", "fp16") and names and set(names) <= known


def _pick(op, dtype):
    impl = backends.select(op, "cpu", dtype)
    return next(n for n, b in backends._BACKENDS.items() if b.available() is None and b.table()[op] is impl)


def test_registry_follows_measured_order_per_op_and_dtype(fresh_orders):
    if backends.get_backend("cpp").available() is not None:
        pytest.skip(backends.get_backend("cpp").available())
    fresh_orders.setitem(measured_order.MEASURED_ORDER, "cpu", {"fake_quantize": {"fp32": ["reference", "cpp"]}})
    assert _pick("fake_quantize", torch.float32) == "reference"
    assert backends.default_order("cpu", "fake_quantize", torch.float32) == ["reference", "cpp"]
    # other dtypes and ops: the device type's order
    assert _pick("fake_quantize", torch.bfloat16) == "cpp"
    assert _pick("fake_quantize_backward", torch.float32) == "cpp"
    assert backends.default_order("cpu") == ["cpp", "reference"]


def test_measured_backend_unavailable_falls_through(fresh_orders):
    fresh_orders.setitem(measured_order.MEASURED_ORDER, "cpu", {"sam_restore_": {"fp32": ["triton"]}})
    # triton does not serve CPU tensors outside its interpreter: the device order takes over
    expect = "cpp" if backends.get_backend("cpp").available() is None else "reference"
    if backends.get_backend("triton").supports("sam_restore_", "cpu", torch.float32) is None:
        expect = "triton"
    assert _pick("sam_restore_", torch.float32) == expect
    assert backends.default_order("cpu", "sam_restore_", torch.float32)[0] == "triton"


def test_set_default_order_overrides_measured_orders(fresh_orders):
    fresh_orders.setitem(measured_order.MEASURED_ORDER, "cpu", {"fake_quantize": {"fp32": ["cpp", "reference"]}})
    backends.set_default_order("cpu", ["reference"])
    assert backends.default_order("cpu", "fake_quantize", torch.float32) == ["reference"]
    assert _pick("fake_quantize", torch.float32) == "reference"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        backends.set_default_order("cpu", ["nope"])


def test_explicit_choice_beats_measured_order(fresh_orders):
    fresh_orders.setitem(measured_order.MEASURED_ORDER, "cpu", {"grad_sq_norm": {"fp32": ["cpp"]}})
    with backends.use_backend("reference"):
        assert _pick("grad_sq_norm", torch.float32) == "reference"
