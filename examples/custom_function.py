"""verify_function on a custom autograd.Function with a hand-written backward."""

import torch

from torchgradcheck import verify_function


class MyLinear(torch.autograd.Function):
    """y = x @ w.T + b, with its backward written by hand."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return x @ w.T + b

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.T @ x, g.sum(0)


torch.manual_seed(0)
x = torch.randn(8, 5, requires_grad=True)
w = torch.randn(3, 5, requires_grad=True)
b = torch.randn(3, requires_grad=True)

report = verify_function(MyLinear.apply, x, w, b)  # any callable of tensors
print(report)
assert report.passed, report
