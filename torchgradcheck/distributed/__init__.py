"""verify_distributed: split and lockstep checks under torch.distributed (see README.md in this folder)."""

from ._verify import verify_distributed

__all__ = ["verify_distributed"]
