"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts use it."""

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.linear import linear


class FFN(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = linear(hidden_size, intermediate_size)
        self.up_proj = linear(hidden_size, intermediate_size)
        self.down_proj = linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
