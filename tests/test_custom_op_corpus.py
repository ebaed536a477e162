"""`torch.library.custom_op` + `register_autograd` operators: correct ones pass, buggy twins fail.

No operator registers a jvp: forward mode is noted as unavailable, never compared.
"""

from __future__ import annotations

import warnings

import pytest
from custom_ops_corpus import BUGGY, CORRECT

from torchgradcheck import verify_function


def _run(case):
    fn, args, kwargs = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "batching rule" C++ chatter is another issue's business
        return verify_function(fn, *args, **kwargs)


@pytest.mark.parametrize("name", list(CORRECT))
def test_custom_op_passes(name):
    report = _run(CORRECT[name]())
    assert report.passed, report
    assert not any(r.kind == "forward mode" for r in report.results)
    assert any("forward mode unavailable" in n for n in report.notes), report.notes


@pytest.mark.parametrize("name", list(BUGGY))
def test_custom_op_buggy_twin_fails(name):
    report = _run(BUGGY[name]())
    assert not report.passed, report
    assert any(r.kind == "input" and not r.passed for r in report.results), report
