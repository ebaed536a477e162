"""A torch.library custom op: one report for "is my custom op right?" (gradients and opcheck)."""

import torch

from torchgradcheck import verify_function


@torch.library.custom_op("demo::scaled_tanh", mutates_args=())
def scaled_tanh(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.tanh(x) * scale


@scaled_tanh.register_fake
def _(x, scale):
    return torch.empty_like(x)


def setup_context(ctx, inputs, output):
    _, scale = inputs
    ctx.save_for_backward(output)
    ctx.scale = scale


def backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return grad * (ctx.scale - y * y / ctx.scale), None  # d/dx s*tanh(x) = s - y^2/s


scaled_tanh.register_autograd(backward, setup_context=setup_context)

torch.manual_seed(0)
x = torch.randn(3, 4, requires_grad=True)

report = verify_function(scaled_tanh, x, 2.0)  # or torch.ops.demo.scaled_tanh
print(report)
assert report.passed, report
