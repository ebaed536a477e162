"""Loading the pytest plugin (and the package) must not import torch: pytest's start-up stays fast.

Each check runs in a fresh interpreter, and each has a meta-test showing it can fail.
"""

from __future__ import annotations

import subprocess
import sys

pytest_plugins = ["pytester"]

PROBE = """
import sys
{imports}
print(",".join(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))) or "-")
"""


def _torch_modules_after(imports: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(imports=imports)], capture_output=True, text=True, check=True, timeout=120
    )
    return out.stdout.strip()


def test_plugin_import_leaves_torch_out():
    assert _torch_modules_after("import torchgradcheck.pytest_plugin") == "-"


def test_package_import_leaves_torch_out():
    assert _torch_modules_after("import torchgradcheck\nimport torchgradcheck.pytest_plugin as p\np.Gradcheck()") == "-"


def test_meta_probe_sees_torch_when_imported():
    # the probe above can fail: importing the checker itself does pull in torch
    assert "torch" in _torch_modules_after("import torchgradcheck._verify").split(",")


NO_TORCH_TEST = """
import sys

def test_no_torch_at_collection():
    assert "torch" not in sys.modules
"""


def test_pytest_session_with_plugin_has_no_torch(pytester):
    pytester.makepyfile(test_light=NO_TORCH_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["plugins:*torchgradcheck*"])  # loaded through the pytest11 entry point
    result.assert_outcomes(passed=1)


def test_meta_pytest_session_check_can_fail(pytester):
    pytester.makepyfile(test_light=NO_TORCH_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "torchgradcheck._verify")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*assert 'torch' not in *"])
