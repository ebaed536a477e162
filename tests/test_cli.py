"""The command line: ``torchgradcheck demo`` and ``torchgradcheck check FILE.py:FACTORY [--json]``.

Exit status: 0 pass, 1 mismatch, 2 anything that is not a verdict (bad target, raising factory, bad argument).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from torchgradcheck.cli import main

FACTORIES = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class _Square(torch.autograd.Function):
        """x**2 with a backward that forgets the factor 2 when `bug` is set."""

        @staticmethod
        def forward(ctx, x, bug):
            ctx.save_for_backward(x)
            ctx.bug = bug
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (x if ctx.bug else 2 * x), None


    class Net(nn.Module):
        def __init__(self, bug):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(3, 2)
            self.bug = bug

        def forward(self, x):
            return _Square.apply(self.fc(x), self.bug)


    def _batch():
        gen = torch.Generator().manual_seed(0)
        return torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen)


    def good():
        return Net(False), nn.MSELoss(), _batch()


    def bad():
        return Net(True), nn.MSELoss(), _batch()


    def as_dict():
        return {"model": Net(False), "loss_fn": nn.MSELoss(), "batch": _batch(), "params": "fc.weight"}


    def not_a_case():
        return 42


    def raises():
        raise RuntimeError("factory exploded")


    def bad_loss():
        return Net(False), nn.MSELoss(reduction="none"), _batch()


    def unknown_option():
        return {"model": Net(False), "loss_fn": nn.MSELoss(), "batch": _batch(), "rtoll": 1e-3}

    NOT_CALLABLE = 3
    '''
)


@pytest.fixture
def cases(tmp_path):
    path = tmp_path / "cases.py"
    path.write_text(FACTORIES)
    return path


def _run(argv, capsys):
    saved = list(sys.path)
    code = main(argv)
    out, err = capsys.readouterr()
    assert sys.path == saved  # the target's folder does not stay on sys.path
    return code, out, err


def test_cli_check_passes_a_correct_model(cases, capsys):
    code, out, _ = _run(["check", f"{cases}:good"], capsys)
    assert code == 0
    assert out.startswith("verify_module: OK, 2 tensors (8 elements) agree")
    assert "  fc.weight  (2, 3)  ok" in out


@pytest.mark.slow
def test_cli_check_exits_1_on_a_mismatch(cases, capsys):
    """Default options: the failure also localises the wrong backward (slow)."""
    code, out, _ = _run(["check", f"{cases}:bad"], capsys)
    assert code == 1
    assert out.startswith("verify_module: FAILED, gradients disagree for 2 of 2 tensors")
    assert "fc.weight[" in out
    assert "This usually means one of:" in out
    assert "first wrong backward:" in out


def test_cli_check_no_localise_exits_1_on_a_mismatch(cases, capsys):
    code, out, _ = _run(["check", f"{cases}:bad", "--no-localise"], capsys)
    assert code == 1
    assert out.startswith("verify_module: FAILED, gradients disagree for 2 of 2 tensors")
    assert "fc.weight[" in out
    assert "first wrong backward:" not in out


def test_cli_check_accepts_a_dict_of_arguments(cases, capsys):
    code, out, _ = _run(["check", f"{cases}:as_dict", "--engine", "loop", "--seed", "3"], capsys)
    assert code == 0
    assert "fc.bias" in out
    assert "skipped" in out
    assert "seed=3" in out
    assert "engine=loop" in out


@pytest.mark.parametrize(("target", "code"), [("good", 0), ("bad", 1)])
def test_cli_check_json_is_valid(cases, capsys, target, code):
    exit_code, out, _ = _run(["check", f"{cases}:{target}", "--json", "--no-localise"], capsys)
    assert exit_code == code
    data = json.loads(out)
    assert data["passed"] is (code == 0)
    assert [r["name"] for r in data["results"]] == ["fc.weight", "fc.bias"]
    assert data["options"]["dtype"] == "float64"


def test_cli_check_passes_tolerance_options(cases, capsys):
    code, out, _ = _run(
        ["check", f"{cases}:good", "--json", "--eps", "1e-5", "--rtol", "1e-4", "--atol", "1e-9"], capsys
    )
    assert code == 0
    options = json.loads(out)["options"]
    assert (options["eps"], options["rtol"], options["atol"]) == (1e-5, 1e-4, 1e-9)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_colon", r"expected FILE\.py:FACTORY \(e\.g\. models\.py:make_case\), got 'no_colon'"),
        ("{cases}:", r"expected FILE\.py:FACTORY"),
        ("missing.py:good", r"no such file 'missing\.py' \(from 'missing\.py:good'\); give a path to a Python file"),
        ("{cases}:nope", r"cases\.py has no callable 'nope'; callables there: \[.*'good'"),
        ("{cases}:NOT_CALLABLE", r"has no callable 'NOT_CALLABLE'"),
        (
            "{cases}:not_a_case",
            r"not_a_case\(\) must return \(model, loss_fn, batch\) or a dict of verify_module "
            r"arguments, got int",
        ),
        ("{cases}:raises", r"raises\(\) raised \(traceback above\)"),
        ("{cases}:bad_loss", r"verify_module\(model, loss_fn, batch\): the loss has shape \(4, 2\), not a scalar"),
        ("{cases}:unknown_option", r"unknown option rtoll=0\.001\. Did you mean rtol=\?"),
    ],
)
def test_cli_check_bad_target_is_a_clear_error(cases, capsys, target, message):
    code, out, err = _run(["check", target.format(cases=cases)], capsys)
    assert code == 2
    assert out == ""
    assert re.search(r"^torchgradcheck check: .*" + message, err, re.MULTILINE), err


def test_cli_check_shows_the_traceback_of_a_raising_factory(cases, capsys):
    code, _, err = _run(["check", f"{cases}:raises"], capsys)
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert "RuntimeError: factory exploded" in err


def test_cli_rejects_unknown_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def _subprocess(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # no thread oversubscription on a busy machine
    return subprocess.run(
        [sys.executable, "-m", "torchgradcheck", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


@pytest.mark.slow
def test_cli_module_entry_point_exit_codes(cases):
    good = _subprocess("check", f"{cases}:good")
    assert good.returncode == 0, good.stderr
    assert "verify_module: OK" in good.stdout
    bad = _subprocess("check", f"{cases}:bad", "--json", "--no-localise")
    assert bad.returncode == 1, bad.stderr
    assert json.loads(bad.stdout)["passed"] is False
    spec = _subprocess("check", "no_such_file.py:make")
    assert spec.returncode == 2
    assert "torchgradcheck check: no such file 'no_such_file.py'" in spec.stderr


@pytest.mark.slow
def test_cli_demo_exits_0_with_both_verdicts_as_expected():
    result = _subprocess("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "(expected: pass)\nverify_module: OK" in out
    assert "(expected: fail)\nverify_module: FAILED" in out
    assert out.rstrip().endswith("demo: both verdicts as expected")


@pytest.mark.slow
def test_cli_demo_json_is_one_valid_document():
    result = _subprocess("demo", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["as_expected"] is True
    assert [(c["expected_pass"], c["report"]["passed"]) for c in data["cases"]] == [(True, True), (False, False)]
    assert "demo: both verdicts as expected" in result.stderr


def test_cli_check_mode_params_and_inputs(cases, capsys):
    code, out, _ = _run(
        ["check", f"{cases}:bad", "--json", "--mode", "full", "--params", "fc.bias", "--inputs", "--no-localise"],
        capsys,
    )
    assert code == 1
    data = json.loads(out)
    assert data["options"]["mode"] == "full"
    assert {r["name"]: r["status"] for r in data["results"]} == {
        "fc.bias": "mismatch",
        "fc.weight": "skipped",
        "batch[0]": "mismatch",
        "batch[1]": "ok",
    }


def test_cli_check_repeated_params(cases, capsys):
    code, out, _ = _run(["check", f"{cases}:good", "--json", "--params", "fc.bias", "--params", "fc.w*"], capsys)
    assert code == 0
    assert {r["name"]: r["status"] for r in json.loads(out)["results"]} == {"fc.weight": "ok", "fc.bias": "ok"}


def test_cli_check_factory_dict_options_and_command_line_options_combine(tmp_path, capsys):
    """A factory's dict may set options (atol=...); the command line overrides only what it names."""
    path = tmp_path / "made.py"
    path.write_text(
        "import torch\n"
        "from torch import nn\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return dict(model=nn.Linear(3, 2), loss_fn=nn.MSELoss(),\n"
        "                batch=(torch.randn(4, 3), torch.randn(4, 2)), atol=1e-12, mode='full')\n"
    )
    from torchgradcheck.cli import main

    assert main(["check", f"{path}:make", "--json", "--seed", "3"]) == 0
    options = json.loads(capsys.readouterr().out)["options"]
    assert (options["atol"], options["mode"], options["seed"]) == (1e-12, "full", 3)
