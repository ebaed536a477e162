"""The README's recipe for PyTorch's own test harness, run as PyTorch runs its test files.

`examples/pytorch_testcase.py` subclasses `torch.testing._internal.common_utils.TestCase` and uses
`instantiate_device_type_tests`; importing that harness calls `torch.backends.disable_global_flags()`,
so every check in it runs with frozen backend flags (asserted in its setUp). It runs in a
subprocess, so the frozen flags don't leak into this test session, with every warning an error
(except the harness's own ImportWarning when hypothesis is not installed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "pytorch_testcase.py"


@pytest.mark.slow  # a subprocess importing PyTorch's test harness (~5 s on an idle 2-core machine)
def test_pytorch_harness_recipe_passes_with_frozen_flags_and_warnings_as_errors():
    pytest.importorskip("expecttest")
    cmd = [sys.executable, "-W", "error", "-W", "ignore:Fail to import hypothesis:ImportWarning", str(RECIPE), "-v"]
    # Under CI=true PyTorch's run_tests() writes JUnit XML through `xmlrunner` (unittest-xml-reporting),
    # which is PyTorch's CI dependency, not ours: run the recipe as a developer would, without CI set.
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    for name in ("test_function_cpu", "test_function_buggy_twin_fails_cpu", "test_module_cpu"):
        assert f"{name} (__main__.TestSwishGradientsCPU.{name}) ... ok" in out, out
    assert "Ran 3 tests" in out
    assert "OK" in out.splitlines()[-1]
    assert "Warning" not in out  # no C++ or Python warning printed
