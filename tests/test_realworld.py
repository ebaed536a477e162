"""Awkward real-world models (issue 9): correct ones pass, buggy twins fail, the model is left as it was."""

import random

import pytest
from helpers import assert_unchanged, snapshot
from realworld_corpus import CASES

from torchgradcheck import verify_module


def _cases():
    for name, (_, factor) in CASES.items():
        yield pytest.param(name, None, id=f"{name}-correct")
        yield pytest.param(name, factor, id=f"{name}-bug")


@pytest.mark.parametrize(("name", "bug"), list(_cases()))
def test_realworld_verdict(name, bug):
    random.seed(0)
    case = CASES[name][0](bug)
    before = snapshot(case.model)
    report = verify_module(case.model, case.loss_fn, case.batch, localise=False, **case.kwargs)
    assert_unchanged(before, case.model)
    if case.expect == "pass":
        assert report.passed, report
    else:  # "fail", or "no power": never an OK
        assert not report.passed, report
    if case.expect == "no power":
        assert not report.powered, report
        assert "nothing was tested with power" in report.headline()


def test_embedding_padding_row_is_listed_not_failed():
    case = CASES["embedding_padding_idx"][0]()
    report = verify_module(case.model, case.loss_fn, case.batch)
    emb = next(r for r in report.results if r.name == "emb.weight")
    assert emb.status == "ok", report
    assert "padding_idx" in emb.note
    assert emb.checked == 36  # 10 x 4 elements, the padding row's 4 excluded
