"""torchgradcheck inside PyTorch's own test harness: TestCase + instantiate_device_type_tests.

Run it as PyTorch runs its test files (`python examples/pytorch_testcase.py`) or with pytest.
PyTorch's harness freezes the backend flags (torch.backends.disable_global_flags()) on import;
the checks work under frozen flags and leave every flag as it was.
"""

# example: not-run-by-test-examples (tests/test_pytorch_harness.py runs it, with -W error)

import torch
from torch import nn
from torch.testing._internal.common_device_type import instantiate_device_type_tests
from torch.testing._internal.common_utils import TestCase, run_tests

from torchgradcheck import verify_function, verify_module


class Swish(torch.autograd.Function):
    @staticmethod
    def forward(x, bug):
        return x * torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.bug = inputs[1]

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * s * (1 + x * (1 - s)) * (1.02 if ctx.bug else 1.0), None


class TestSwishGradients(TestCase):
    def setUp(self):
        super().setUp()
        assert torch.backends.flags_frozen()  # the harness froze the backend flags
        self.flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)

    def tearDown(self):
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == self.flags
        assert torch.backends.flags_frozen()
        super().tearDown()

    def test_function(self, device):
        x = torch.randn(6, 5, device=device, requires_grad=True)
        verify_function(Swish.apply, x, False).assert_passed()

    def test_function_buggy_twin_fails(self, device):
        x = torch.randn(6, 5, device=device, requires_grad=True)
        report = verify_function(Swish.apply, x, True)
        assert not report.passed
        assert [r.name for r in report.failures] == ["grad w.r.t. x"]

    def test_module(self, device):
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(device)
        x, y = torch.randn(16, 5, device=device), torch.randn(16, 1, device=device)
        verify_module(model, nn.MSELoss(), (x, y), mode="full").assert_passed()


instantiate_device_type_tests(TestSwishGradients, globals(), only_for=("cpu", "cuda"))

if __name__ == "__main__":
    run_tests()
