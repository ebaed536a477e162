"""The Report: statuses, to_dict, str (compact, names elements, bounded), assert_passed, snapshot of the table."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from corpus import HandLinear
from helpers import assert_unchanged, snapshot
from torch import nn

from torchgradcheck import ElementResult, GradientMismatchError, ParameterResult, Report, TensorResult, verify_module


def _one_percent_off_at_3_7(gx, gw, gb):
    gw = gw.clone()
    gw[3, 7] *= 1.01
    return gx, gw, gb


def _ten_percent_off_at_1_2(gx, gw, gb):
    gw = gw.clone()
    gw[1, 2] *= 1.1
    return gx, gw, gb


class EveryStatus(nn.Module):
    """One tensor per status: ok, zero, mismatch, no gradient, unused, skipped (frozen and params=)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.zero_in = nn.Linear(3, 2)  # sees an all-zero input: weight gradient exactly 0
        self.cut = nn.Linear(3, 2)  # output detached: .grad None, loss depends on it
        self.spare = nn.Parameter(torch.randn(2))  # never used
        self.frozen = nn.Linear(3, 2).requires_grad_(False)
        self.bad = HandLinear(3, 2, _ten_percent_off_at_1_2)
        self.other = nn.Linear(3, 2)  # excluded by params=
        self.scale = nn.Parameter(torch.tensor(1.3))  # 0-dim

    def forward(self, x):
        total = self.zero_in(torch.zeros_like(x)) + self.cut(x).detach() + self.frozen(x) + self.bad(x) + self.other(x)
        return self.scale * total


EXPECTED_STATUS = {
    "spare": "unused",
    "scale": "ok",
    "zero_in.weight": "zero",
    "zero_in.bias": "ok",
    "cut.weight": "no gradient",
    "cut.bias": "no gradient",
    "bad.weight": "mismatch",
    "bad.bias": "ok",
    "frozen.weight": "skipped",
    "frozen.bias": "skipped",
    "other.weight": "skipped",
    "other.bias": "skipped",
}
PATTERNS = ["zero_in.*", "cut.*", "spare", "frozen.*", "bad.*", "scale"]


@pytest.fixture(scope="module")
def every_status():
    model = EveryStatus()
    gen = torch.Generator().manual_seed(2)
    batch = (torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen))
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, params=PATTERNS, localise=False, mode="full")
    assert_unchanged(before, model)
    return report


# ------------------------------------------------------------------------------ verdicts and statuses


def test_report_statuses_cover_every_case(every_status):
    report = every_status
    assert {r.name: r.status for r in report.results} == EXPECTED_STATUS
    assert not report.passed
    assert not bool(report)
    assert [r.name for r in report.failures] == ["cut.weight", "cut.bias", "bad.weight"]
    for r in report.results:
        assert r.passed == (r.status in ("ok", "zero", "unused", "skipped"))


def test_report_counts_failed_elements(every_status):
    by_name = {r.name: r for r in every_status.results}
    bad = by_name["bad.weight"]
    assert (bad.failed, bad.checked, bad.shape) == (1, 6, (2, 3))
    assert bad.worst[0].index == (1, 2)
    assert bad.worst[0].analytical == pytest.approx(1.1 * bad.worst[0].numerical, rel=1e-6)
    assert (by_name["cut.weight"].failed, by_name["cut.weight"].checked) == (6, 6)
    assert all(w.analytical == 0.0 for w in by_name["cut.weight"].worst)
    assert by_name["scale"].shape == ()
    assert by_name["scale"].worst[0].index == ()


def test_report_skipped_parameters_are_listed_with_the_reason(every_status):
    skipped = {r.name: r for r in every_status.results if r.status == "skipped"}
    assert {n: r.note for n, r in skipped.items()} == {
        "frozen.weight": "frozen",
        "frozen.bias": "frozen",
        "other.weight": "not selected by params=",
        "other.bias": "not selected by params=",
    }
    assert skipped["frozen.weight"].shape == (2, 3)
    assert skipped["frozen.weight"].checked == 0
    text = str(every_status)
    assert "frozen.weight: frozen" in text
    assert "other.bias: not selected by params=" in text


def test_report_notes_explain_no_gradient_and_unused(every_status):
    by_name = {r.name: r for r in every_status.results}
    assert "the loss depends on this tensor: something cuts it off" in by_name["cut.weight"].note
    assert "the loss does not depend on it" in by_name["spare"].note


def test_report_relative_errors(every_status):
    by_name = {r.name: r for r in every_status.results}
    assert by_name["cut.weight"].relative_error == pytest.approx(1.0)
    assert by_name["bad.bias"].relative_error < 1e-8
    assert 1e-3 < by_name["bad.weight"].relative_error < 0.1
    assert 0 < every_status.relative_error < 1


def test_report_records_options_and_cost(every_status):
    options = every_status.options
    assert options["dtype"] == "float64"
    assert options["device"] == "cpu"
    assert options["eps"] > 0
    assert options["rtol"] >= 0
    assert options["atol"] == 0
    assert options["seed"] == 0
    assert every_status.evaluations > 2 * 6
    assert every_status.seconds > 0
    assert every_status.engine in ("loop", "vmap", "cone")


def test_report_passing_headline():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    batch = (torch.randn(5, 3), torch.randn(5, 2))
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, mode="full")
    assert_unchanged(before, model)
    assert report.passed
    assert bool(report)
    assert report.failures == ()
    assert re.match(
        r"verify_module: OK, 4 tensors \(26 elements\) agree \(relative error \d\.\d\de-\d\d\)$",
        str(report).splitlines()[0],
    )
    assert "This usually means" not in str(report)
    report.assert_passed()  # returns quietly


def test_report_is_frozen(every_status):
    with pytest.raises(dataclasses.FrozenInstanceError):
        every_status.relative_error = 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        every_status.results[0].status = "ok"


# ------------------------------------------------------------------------------ to_dict


def test_report_to_dict_is_json_and_round_trips(every_status):
    report = every_status
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False
    assert data["call"] == "verify_module"
    assert data["relative_error"] == report.relative_error
    assert data["evaluations"] == report.evaluations
    assert data["options"] == report.options.to_dict()
    assert [(d["name"], d["status"], tuple(d["shape"]), d["passed"]) for d in data["results"]] == [
        (r.name, r.status, r.shape, r.passed) for r in report.results
    ]
    bad = next(d for d in data["results"] if d["name"] == "bad.weight")
    assert (bad["failed"], bad["checked"], bad["worst"][0]["index"]) == (1, 6, [1, 2])
    worst = report.results[[r.name for r in report.results].index("bad.weight")].worst[0]
    assert bad["worst"][0]["numerical"] == worst.numerical
    assert bad["worst"][0]["analytical"] == worst.analytical
    assert "errors" not in bad  # per-element arrays are for pictures, not for JSON


def test_report_to_dict_writes_non_finite_floats_as_strings():
    report = Report(
        call="verify_module",
        results=(
            ParameterResult(
                "w",
                (2,),
                "mismatch",
                relative_error=math.nan,
                max_abs_error=math.inf,
                checked=2,
                failed=1,
                worst=(ElementResult((1,), math.nan, 1.0, math.inf, 1e-7),),
            ),
        ),
        relative_error=math.nan,
    )
    text = json.dumps(report.to_dict(), allow_nan=False)
    data = json.loads(text)
    assert data["relative_error"] == "nan"
    assert data["results"][0]["max_abs_error"] == "inf"
    assert data["results"][0]["worst"][0]["numerical"] == "nan"


# ------------------------------------------------------------------------------ str


def test_report_str_names_the_wrong_element():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = HandLinear(10, 8, _one_percent_off_at_3_7)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("encoder", Net())
    batch = (torch.randn(6, 10), torch.randint(0, 3, (6,)))
    before = snapshot(model)
    report = verify_module(model, nn.CrossEntropyLoss(), batch, localise=False, mode="full")
    assert_unchanged(before, model)
    text = str(report)
    assert [r.name for r in report.failures] == ["encoder.fc1.weight"]
    assert "    encoder.fc1.weight[3, 7]: numerical " in text
    row = next(line for line in text.splitlines() if line.startswith("  encoder.fc1.weight "))
    assert "mismatch (1/" in row
    assert "[3, 7]" in row
    assert "tensor(" not in text


def _bounded(text: str) -> None:
    assert "tensor(" not in text
    assert "array(" not in text
    assert len(text) < 4000, len(text)
    assert max(len(line) for line in text.splitlines()) < 300


def test_report_str_is_bounded_for_a_large_wrong_weight():
    torch.manual_seed(0)
    model = nn.Sequential(HandLinear(100, 100, lambda gx, gw, gb: (gx, 2 * gw, gb)), nn.Tanh(), nn.Linear(100, 1))
    batch = (torch.randn(2, 100), torch.randn(2, 1))
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, params="0.weight", mode="sampled", localise=False)
    assert_unchanged(before, model)
    assert [r.name for r in report.failures] == ["0.weight"]
    _bounded(str(report))
    assert len(json.dumps(report.to_dict())) < 20000


def test_report_str_is_bounded_whatever_the_result_holds():
    """Even a result carrying 10,000 worst elements and 10,000 kinks renders a few lines."""
    worst = tuple(ElementResult((i // 100, i % 100), 1.0, 2.0, 1.0, 1e-6) for i in range(10_000))
    kinks = tuple((i // 100, i % 100) for i in range(10_000))
    report = Report(
        call="verify_module",
        relative_error=0.3,
        results=(
            ParameterResult(
                "fc.weight",
                (100, 100),
                "mismatch",
                relative_error=0.3,
                max_abs_error=1.0,
                checked=10_000,
                failed=10_000,
                worst=worst,
                not_differentiable=kinks,
            ),
        ),
    )
    text = str(report)
    _bounded(text)
    assert (
        "fc.weight: 10000 element(s) not differentiable here (excluded): fc.weight[0, 0], fc.weight[0, 1], "
        "fc.weight[0, 2] and 9997 more" in text
    )
    assert text.count("fc.weight[") == 6  # 3 worst + 3 kinks


# ------------------------------------------------------------------------------ assert_passed


def test_report_assert_passed_raises_assertion_error_with_the_table(every_status):
    with pytest.raises(GradientMismatchError) as info:
        every_status.assert_passed()
    error = info.value
    assert isinstance(error, AssertionError)
    assert error.report is every_status
    assert str(error) == str(every_status)
    assert "bad.weight[1, 2]: numerical" in str(error)
    with pytest.raises(AssertionError, match=r"FAILED, gradients disagree for 3 of 8 tensors"):
        every_status.assert_passed()


def test_report_works_with_plain_assert(every_status):
    """``assert report, report``: bool() is the verdict; outside pytest the message is the table.

    (pytest's assertion rewriting shows a non-str message through a 240-character repr: write
    ``assert report.passed, str(report)`` or ``report.assert_passed()`` in tests.)
    """
    with pytest.raises(AssertionError):
        assert every_status
    assert str(AssertionError(every_status)) == str(every_status)


# ------------------------------------------------------------------------------ snapshots


def hand_report() -> Report:
    return Report(
        call="verify_module",
        results=(
            ParameterResult(
                "encoder.fc1.weight",
                (64, 32),
                "mismatch",
                relative_error=4.7e-3,
                max_abs_error=3.11e-2,
                checked=2048,
                failed=2,
                worst=(
                    ElementResult((3, 7), 0.0661, 0.035, 0.0311, 6.61e-8),
                    ElementResult((5, 1), 0.5, 0.51, 0.01, 5e-7),
                    ElementResult((0, 0), 0.25, 0.25, 1e-12, 2.5e-7),
                ),
            ),
            ParameterResult(
                "encoder.fc1.bias",
                (64,),
                "ok",
                relative_error=1.2e-11,
                max_abs_error=3.4e-12,
                checked=64,
                worst=(ElementResult((12,), -0.25, -0.25, 3.4e-12, 2.5e-7),),
            ),
            ParameterResult(
                "head.weight",
                (2, 64),
                "no gradient",
                relative_error=1.0,
                max_abs_error=0.5,
                checked=128,
                failed=128,
                worst=(ElementResult((1, 0), 0.5, 0.0, 0.5, 5e-7),),
                note=".grad is None after backward, but the loss depends on this tensor",
            ),
            ParameterResult(
                "spare",
                (3,),
                "unused",
                relative_error=0.0,
                max_abs_error=0.0,
                checked=3,
                note=".grad is None after backward and the loss does not depend on it",
            ),
            ParameterResult(
                "act.alpha",
                (),
                "ok",
                relative_error=2e-12,
                max_abs_error=1e-12,
                checked=1,
                worst=(ElementResult((), 1.5, 1.5, 1e-12, 1.5e-6),),
            ),
            ParameterResult(
                "relu_in.weight",
                (4, 4),
                "ok",
                relative_error=3e-11,
                max_abs_error=2e-11,
                checked=15,
                not_differentiable=((0, 1),),
            ),
            ParameterResult("frozen.weight", (4, 4), "skipped", note="frozen"),
        ),
        relative_error=2.5e-3,
        options={"dtype": "float64", "device": "cpu", "eps": 6e-06, "rtol": 1e-06, "atol": 0.0, "seed": 0},
        evaluations=4567,
        seconds=1.234,
        engine="vmap",
        notes=("an example note",),
    )


HAND_REPORT = """\
verify_module: FAILED, gradients disagree for 2 of 6 tensors (relative error 2.50e-03)
  tensor              shape     status                 coverage  rel.err   max|a-n|  worst element  numerical  autograd  tol
  encoder.fc1.weight  (64, 32)  mismatch (2/2048)      full      4.70e-03  3.11e-02  [3, 7]         0.0661     0.035     6.61e-08
  encoder.fc1.bias    (64)      ok                     full      1.20e-11  3.40e-12  [12]           -0.25      -0.25     2.50e-07
  head.weight         (2, 64)   no gradient (128/128)  full      1.00e+00  5.00e-01  [1, 0]         0.5        0         5.00e-07
  spare               (3)       unused                 full      0.00e+00  0.00e+00  -              -          -         -
  act.alpha           ()        ok                     full      2.00e-12  1.00e-12  ()             1.5        1.5       1.50e-06
  relu_in.weight      (4, 4)    ok                     full      3.00e-11  2.00e-11  -              -          -         -
  frozen.weight       (4, 4)    skipped                -         -         -         -              -          -         -
  encoder.fc1.weight: 2 element(s) over tolerance; worst:
    encoder.fc1.weight[3, 7]: numerical 0.0661, autograd 0.035, |diff| 3.11e-02 > tol 6.61e-08
    encoder.fc1.weight[5, 1]: numerical 0.5, autograd 0.51, |diff| 1.00e-02 > tol 5.00e-07
  head.weight: 128 element(s) over tolerance; worst:
    head.weight[1, 0]: numerical 0.5, autograd 0, |diff| 5.00e-01 > tol 5.00e-07
  head.weight: .grad is None after backward, but the loss depends on this tensor
  spare: .grad is None after backward and the loss does not depend on it
  relu_in.weight: 1 element(s) not differentiable here (excluded): relu_in.weight[0, 1]
  frozen.weight: frozen
  note: an example note
Checked with: dtype=float64 device=cpu eps=6e-06 rtol=1e-06 atol=0.0 seed=0 engine=vmap; 4,567 evaluations in #.## s
This usually means one of:
  1. a custom autograd.Function or hand-written backward returns a wrong gradient;
  2. a .detach(), torch.no_grad() or .data cuts a parameter off from the loss (status "no gradient");
  3. the loss is computed differently with and without autograd (e.g. branches on requires_grad).
Elements at kinks (relu/abs/max at 0) are listed as "not differentiable here", never as failures."""  # noqa: E501


def _normalise_timing(text: str) -> str:
    return re.sub(r"evaluations in \d+\.\d\d s", "evaluations in #.## s", text)


def test_report_snapshot_of_a_hand_built_report():
    assert _normalise_timing(str(hand_report())) == HAND_REPORT


_NUMBER = re.compile(r"^-?\d+(\.\d+)?(e[+-]\d+)?$")

# The table of the EveryStatus check, one row per tensor, numbers replaced by '#'. The worst element is
# kept only where it is determined (failures); elsewhere it is rounding noise and normalised to '*'.
EVERY_STATUS_TABLE = """\
tensor | shape | status | coverage | rel.err | max|a-n| | worst element | numerical | autograd | tol
spare | (2) | unused | full | # | # | * | # | # | #
scale | () | ok | full | # | # | * | # | # | #
zero_in.weight | (2, 3) | zero | full | # | # | * | # | # | #
zero_in.bias | (2) | ok | full | # | # | * | # | # | #
cut.weight | (2, 3) | no gradient (6/6) | full | # | # | [1, 1] | # | # | #
cut.bias | (2) | no gradient (2/2) | full | # | # | [1] | # | # | #
bad.weight | (2, 3) | mismatch (1/6) | full | # | # | [1, 2] | # | # | #
bad.bias | (2) | ok | full | # | # | * | # | # | #
frozen.weight | (2, 3) | skipped | - | - | - | - | - | - | -
frozen.bias | (2) | skipped | - | - | - | - | - | - | -
other.weight | (2, 3) | skipped | - | - | - | - | - | - | -
other.bias | (2) | skipped | - | - | - | - | - | - | -"""


def test_report_snapshot_of_a_real_table(every_status):
    lines = str(every_status).splitlines()
    table = lines[1 : 2 + len(every_status.results)]
    assert all(line.startswith("  ") for line in table)
    widths = {len(re.match(r"\s*\S+(\s+)", line).group(0)) for line in table}  # the columns line up
    assert len(widths) == 1
    rows = []
    for line in table:
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] != "tensor":
            cells = [("#" if _NUMBER.match(c) else c) for c in cells]
            if cells[6] != "-" and not cells[2].startswith(("mismatch", "no gradient")):
                cells[6] = "*"
        rows.append(" | ".join(cells))
    assert "\n".join(rows) == EVERY_STATUS_TABLE
    assert lines[0] == lines[0].rstrip()
    assert re.match(
        r"verify_module: FAILED, gradients disagree for 3 of 8 tensors \(relative error [\d.e+-]+\)$", lines[0]
    )


@pytest.mark.slow
def test_report_to_dict_with_localisation_is_json():
    """A default failing check also localises the wrong backward; that part is JSON too."""
    torch.manual_seed(0)
    model = nn.Sequential(HandLinear(3, 4, lambda gx, gw, gb: (gx, 2 * gw, gb)), nn.Tanh(), nn.Linear(4, 2))
    batch = (torch.randn(5, 3), torch.randn(5, 2))
    before = snapshot(model)
    report = verify_module(model, nn.MSELoss(), batch, mode="full")
    assert_unchanged(before, model)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is False
    assert data["localisation"]["first_wrong"] == "0"
    assert data["localisation"]["module_type"] == "HandLinear"


def test_report_repr_fits_pytest_assertion_messages():
    """pytest shows `assert report.passed, report` through a 240-character repr: verdict and worst element first."""
    import corpus

    torch.manual_seed(0)
    report = verify_module(*corpus.one_element_wrong(), localise=False, mode="full")
    text = repr(report)
    assert len(text) <= 240
    assert text.startswith("<Report verify_module: FAILED")
    assert "worst 0.weight[3, 7]" in text


def test_report_warnings_headline_str_dict_and_repr():
    ok = TensorResult(name="w", shape=(2,), status="ok", checked=2, relative_error=0.0, norms=(1.0, 1.0))
    first = "the loss is float32 and its noise hides errors below 1e-4; pass dtype=torch.float64."
    second = "only 3 of 1,000 elements were checked; pass mode='full' for every element."
    report = Report(call="verify_module", results=(ok,), relative_error=0.0, warnings=(first, second))
    assert report.passed
    assert report.headline().startswith(f"verify_module: OK — WARNING: {first} (+1 more);")
    text = str(report)
    assert f"  WARNING: {first}" in text
    assert f"  WARNING: {second}" in text
    assert report.to_dict()["warnings"] == [first, second]
    assert len(repr(report)) <= 240
    long = Report(call="verify_module", results=(ok,), relative_error=0.0, warnings=(first * 4,))
    assert len(repr(long)) == 240
    assert repr(long).endswith("...>")
    quiet = Report(call="verify_module", results=(ok,), relative_error=0.0)
    assert "WARNING" not in str(quiet)
    assert quiet.headline().startswith("verify_module: OK, 1 tensor")
    assert ParameterResult is TensorResult
