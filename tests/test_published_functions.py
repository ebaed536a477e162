"""Hand-written autograd.Functions copied from public repositories: originals pass, planted twins fail.

Second-order trouble of an original (none is marked ``@once_differentiable``) may only show up as a
warning: `report.passed` stays True.
"""

from __future__ import annotations

import pytest
import torch
from published_functions import BUGGY, CORRECT

from torchgradcheck import verify_function


def test_published_corpus_size():
    assert len(CORRECT) >= 17
    assert CORRECT.keys() == BUGGY.keys()


def _inputs_state(args):
    return [(a.detach().clone(), a.requires_grad, a._version) if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("name", list(CORRECT))
def test_published_function_passes(name):
    fn, args, kwargs = CORRECT[name]()
    before = _inputs_state(args)
    report = verify_function(fn, *args, **kwargs)
    assert report.passed, report
    after = _inputs_state(args)
    for b, a in zip(before, after):
        if isinstance(b, tuple):
            assert torch.equal(b[0], a[0])
            assert b[1:] == a[1:]


@pytest.mark.parametrize("name", list(BUGGY))
def test_published_function_buggy_twin_fails(name):
    fn, args, kwargs = BUGGY[name]()
    report = verify_function(fn, *args, **kwargs)
    assert not report.passed, report
    # the planted mistake is first-order: some first-derivative row fails, not only an extra check
    assert any(r.kind == "input" and not r.passed for r in report.results), report
