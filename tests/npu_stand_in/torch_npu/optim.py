"""Stand-in torch_npu.optim: NpuFusedSGD refuses set_to_none as the real one does (its gradients
live in one combined buffer); the update itself is torch's SGD."""

import os

import torch

if os.environ.get("STAND_IN_NO_FUSED_SGD") == "1":
    raise ImportError("this stand-in torch_npu has no NpuFusedSGD")


class NpuFusedSGD(torch.optim.SGD):
    def zero_grad(self, set_to_none=False):
        if set_to_none:
            raise ValueError("set_to_none is not supported in fused optimizers")
        super().zero_grad(set_to_none=False)
