"""The pytest plugin: --gradcheck-* options, the gradcheck fixture, the report table in failure output."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn

from torchgradcheck import GradientMismatchError, Report
from torchgradcheck.pytest_plugin import Gradcheck, moved_model

pytest_plugins = ["pytester"]

# A user's test module: one correct model, one whose custom Function has a wrong backward.
USER_TESTS = """
import torch
from torch import nn


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2.2 * g  # wrong: d(2x)/dx = 2


class Model(nn.Module):
    def __init__(self, bug):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bug = bug

    def forward(self, x):
        y = self.fc(x)
        return _Double.apply(y) if self.bug else 2 * y


def case(bug):
    torch.manual_seed(0)
    return Model(bug), nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 2))


def test_correct_model(gradcheck):
    report = gradcheck(*case(False), engine="loop")
    assert report.passed


def test_buggy_model(gradcheck):
    gradcheck(*case(True), engine="loop")
"""


def _tiny(bug: bool = False) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    if bug:
        model[2].weight.register_hook(lambda g: 1.5 * g)
    return model, nn.MSELoss(), (torch.randn(5, 3), torch.randn(5, 2))


def test_plugin_help_lists_gradcheck_options(pytester):
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(
        [
            "gradient checks (torchgradcheck):",
            "*--gradcheck-mode={auto,full,directional,sampled}",
            "*run every verify_module call made through the gradcheck*",
            "*--gradcheck-device=DEVICE",
            "*move models and batches to DEVICE*",
        ]
    )
    assert result.ret == 0


def test_plugin_failing_check_shows_report_table(pytester):
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_buggy_model _*",
            '*gradcheck(*case(True), engine="loop")',
            "E *GradientMismatchError: verify_module: FAILED, gradients disagree for 2 of 2 tensors*",
            "E * tensor*shape*status*rel.err*max|a-n|*worst element*numerical*autograd*tol",
            "E * fc.weight*(2, 3)*mismatch (6/6)*",
            "E * fc.bias*(2)*mismatch (2/2)*",
            "E * fc.weight[[]*]: numerical *, autograd *, |diff| * > tol *",
            "*This usually means one of:*",
        ]
    )
    out = result.stdout.str()
    # the traceback ends in the user's test: the plugin and report frames are hidden
    assert "pytest_plugin.py" not in out
    assert "_report.py" not in out


def test_plugin_header_and_device_skip(pytester):
    pytester.makepyfile(
        test_device="""
        def test_on_device(gradcheck):
            assert gradcheck.device == "cuda"
            assert gradcheck.mode == "full"
        """
    )
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-rs", "--gradcheck-mode=full", "--gradcheck-device=cuda"
    )
    result.stdout.fnmatch_lines(["torchgradcheck: mode=full, device=cuda"])
    if torch.cuda.is_available():
        result.assert_outcomes(passed=1)
    else:
        result.assert_outcomes(skipped=1)
        result.stdout.fnmatch_lines(["SKIPPED*--gradcheck-device=cuda: not available here*"])


def test_plugin_rejects_unknown_mode(pytester):
    result = pytester.runpytest_subprocess("--gradcheck-mode=exhaustive")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gradcheck-mode: invalid choice: 'exhaustive'*auto*full*directional*sampled*"])


def test_plugin_mode_option_reaches_verify_module(pytester):
    pytester.makepyfile(
        test_mode="""
        import torch
        from torch import nn

        def test_mode(gradcheck):
            assert gradcheck.mode == "full"
            model = nn.Linear(2, 2)
            report = gradcheck(model, nn.MSELoss(), (torch.randn(3, 2), torch.randn(3, 2)), mode="sampled")
            assert report.options["mode"] == "full"  # the command line overrides the test's mode=
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--gradcheck-mode=full")
    result.assert_outcomes(passed=1)


def test_plugin_without_options_leaves_calls_alone(pytester):
    pytester.makepyfile(
        test_plain="""
        def test_plain(gradcheck):
            assert gradcheck.mode is None and gradcheck.device is None
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "torchgradcheck: mode=" not in result.stdout.str()


class _Recorder:
    """A fake verify_module: records its arguments and returns a passing or failing Report."""

    def __init__(self, passed: bool = True) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.passed = passed

    def __call__(self, *args, **kwargs) -> Report:
        self.calls.append((args, kwargs))
        from torchgradcheck import ParameterResult

        status = "ok" if self.passed else "mismatch"
        result = ParameterResult(name="w", shape=(2,), status=status, checked=2, failed=0 if self.passed else 1)
        return Report(call="verify_module", results=(result,), relative_error=0.0)


def test_gradcheck_mode_overrides_the_tests_mode():
    fake = _Recorder()
    Gradcheck(mode="full", verify_module=fake)(nn.Linear(2, 2), nn.MSELoss(), None, mode="directional", seed=3)
    assert fake.calls[0][1] == {"mode": "full", "seed": 3}


def test_gradcheck_passes_no_mode_when_unset():
    fake = _Recorder()
    report = Gradcheck(verify_module=fake)(nn.Linear(2, 2), nn.MSELoss(), None, seed=1)
    assert fake.calls[0][1] == {"seed": 1}
    assert report.passed


def test_gradcheck_raises_with_report_on_failure():
    fake = _Recorder(passed=False)
    with pytest.raises(GradientMismatchError, match=r"FAILED, gradients disagree for 1 of 1 tensors") as info:
        Gradcheck(verify_module=fake)(nn.Linear(2, 2), nn.MSELoss(), None)
    assert info.value.report is not None
    assert not info.value.report.passed


def test_gradcheck_real_check_detects_hook_bug_and_leaves_model_unchanged():
    model, loss_fn, batch = _tiny(bug=True)
    before = snapshot(model)
    with pytest.raises(GradientMismatchError, match=r"2\.weight .*mismatch"):
        Gradcheck()(model, loss_fn, batch, engine="loop")
    assert_unchanged(before, model)
    model, loss_fn, batch = _tiny(bug=False)
    assert Gradcheck()(model, loss_fn, batch).passed


def test_gradcheck_on_cpu_device_moves_batch_and_restores_model():
    model, loss_fn, batch = _tiny()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = snapshot(model)
    fake = _Recorder()
    Gradcheck(device="cpu", verify_module=fake)(model, loss_fn, batch)
    (_, _, moved), _ = fake.calls[0]
    assert moved[0] is not batch[0]
    assert torch.equal(moved[0], batch[0])
    assert_unchanged(before, model)


def test_moved_model_gives_back_the_original_tensors():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[0].weight.grad = torch.randn(4, 3)
    before = snapshot(model)
    with moved_model(model, "meta"):  # the one other device every machine has
        assert model[0].weight.device.type == "meta"
        assert model[1].running_mean.device.type == "meta"
    assert_unchanged(before, model)  # same Parameter objects, storages, grads and buffers


def test_moved_model_restores_on_error():
    model = nn.Linear(2, 2)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), moved_model(model, "meta"):
        raise RuntimeError("boom")
    assert_unchanged(before, model)


def test_gradcheck_function_checks_a_custom_function():
    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * 3 * x**2 * 1.01  # 1 % too large

    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert Gradcheck().function(lambda t: t**3, x).passed
    with pytest.raises(GradientMismatchError, match="FAILED"):
        Gradcheck().function(Cube.apply, x)


@pytest.mark.cuda
def test_gradcheck_on_cuda_checks_there_and_gives_the_model_back():
    model, loss_fn, batch = _tiny()
    before = snapshot(model)
    report = Gradcheck(device="cuda")(model, loss_fn, batch)
    assert report.options["device"].startswith("cuda")
    assert_unchanged(before, model)
    model, loss_fn, batch = _tiny(bug=True)
    with pytest.raises(GradientMismatchError):
        Gradcheck(device="cuda")(model, loss_fn, batch)
    assert model[0].weight.device.type == "cpu"


def test_plugin_modes_mirror_verify_module_modes():
    # the plugin keeps its own copy (importing _modes would import torch at pytest start-up)
    from torchgradcheck._modes import MODES as VERIFY_MODES
    from torchgradcheck.pytest_plugin import MODES

    assert sorted(MODES) == sorted(VERIFY_MODES)


def test_plugin_reemits_report_warnings_as_gradcheck_warning():
    from torchgradcheck import GradcheckWarning, Report
    from torchgradcheck.pytest_plugin import _warn

    report = Report(call="verify_module", results=(), relative_error=0.0, warnings=("the check saw no signal.",))
    with pytest.warns(GradcheckWarning, match=r"^verify_module: the check saw no signal\.$"):
        _warn(report)
