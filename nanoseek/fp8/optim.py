"""AdamW with its two moments stored in BF16, DeepSeek-V3's choice (technical report §3.3.3: "we adopt
the BF16 data format instead of FP32 to track the first and second moments in the AdamW optimizer").

The update is torch.optim.AdamW's (decoupled weight decay, bias correction), computed in FP32 from the
stored moments; only the stored moments are rounded to BF16 (round to nearest), halving the optimizer's
memory. Master weights stay FP32. `moment_dtype=torch.float32` gives torch's AdamW up to rounding of the
operation order (a test pins it).
"""

from __future__ import annotations

import math

import torch


class AdamW(torch.optim.AdamW):
    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, moment_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        self.moment_dtype = moment_dtype

    def _moment(self, state: dict, name: str, p: torch.Tensor) -> torch.Tensor:
        # load_state_dict casts moments to the parameter's dtype: back to the storage dtype (exact)
        if name not in state:
            state[name] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.preserve_format)
        elif state[name].dtype != self.moment_dtype:
            state[name] = state[name].to(self.moment_dtype)
        return state[name]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                state["step"] += 1
                step = float(state["step"])
                exp_avg, exp_avg_sq = self._moment(state, "exp_avg", p), self._moment(state, "exp_avg_sq", p)
                g = p.grad.float()
                m = exp_avg.float().lerp_(g, 1 - beta1)  # in place on the state itself when it is fp32
                v = exp_avg_sq.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                exp_avg.copy_(m)
                exp_avg_sq.copy_(v)
                p.mul_(1 - lr * wd)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - beta1 ** step))
        return loss
