"""Batch independence: output sample i must depend on input sample i only.

Train-mode BatchNorm mixes samples by design (the check names it and says to use eval mode); a
reshape where a transpose was meant mixes them by accident.
"""

import torch
from torch import nn

from torchgradcheck import verify_batch_independence

torch.manual_seed(0)


class SeqFirst(nn.Module):
    """Runs a sequence-first op on a (batch, seq, d) input."""

    def __init__(self, d: int, bug: bool) -> None:
        super().__init__()
        self.proj, self.bug = nn.Linear(d, d), bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.proj(x)
        h = h.reshape(s, b, d) if self.bug else h.transpose(0, 1)  # bug: reshape is not a transpose
        h = torch.cumsum(h, dim=0)  # running sum over the sequence
        return h.reshape(b, s, d) if self.bug else h.transpose(0, 1)


model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
x = torch.randn(4, 4)
report = verify_batch_independence(model, x)  # train mode: fails, names 1 (BatchNorm1d)
print(report.headline())
print(report.table())
print("hint:", report.hint)
print(verify_batch_independence(model.eval(), x).headline())  # eval mode: passes

print(verify_batch_independence(SeqFirst(3, bug=True), torch.randn(3, 5, 3)).headline())
print(verify_batch_independence(SeqFirst(3, bug=False), torch.randn(3, 5, 3)).headline())
