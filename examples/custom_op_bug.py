"""A custom op whose registered backward forgets the scale on one term: the check fails."""

import torch

from torchgradcheck import verify_function


@torch.library.custom_op("demo::scaled_tanh_bug", mutates_args=())
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
    return grad * (ctx.scale - y * y), None  # bug: y^2 should be divided by the scale


scaled_tanh.register_autograd(backward, setup_context=setup_context)

torch.manual_seed(0)
x = torch.randn(3, 4, requires_grad=True)

report = verify_function(scaled_tanh, x, 2.0)
print(report.headline())
for row in report.failures:
    print(f"  {row.name}: {row.status}")
assert [row.name for row in report.failures] == ["grad w.r.t. x"]
