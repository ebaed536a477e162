"""Verdicts on the corpus: every planted bug fails, every correct model passes, nothing changes."""

import pytest
from corpus import BUGS, CORRECT
from helpers import assert_unchanged, snapshot

from torchgradcheck import verify_module

ENGINES = ["loop", "auto"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", sorted(BUGS))
def test_verify_module_fails_planted_bug(case, engine):
    model, loss_fn, batch = BUGS[case]()
    before = snapshot(model)
    report = verify_module(model, loss_fn, batch, engine=engine, mode="full")
    assert not report.passed, report
    assert_unchanged(before, model)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", sorted(CORRECT))
def test_verify_module_passes_correct_model(case, engine):
    model, loss_fn, batch = CORRECT[case]()
    before = snapshot(model)
    report = verify_module(model, loss_fn, batch, engine=engine, mode="full")
    assert report.passed, report
    assert_unchanged(before, model)
