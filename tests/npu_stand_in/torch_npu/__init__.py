"""A stand-in for Ascend's torch_npu, for tests on machines without an NPU: it exposes only what
device.py's decisions read (the chip, its count and bf16 support, the version, NpuFusedSGD, a
GradScaler state with torch_npu's `dynamic` key). Tensors stay on the CPU; nothing here computes on
an NPU.

STAND_IN_NPU_CHIP (default Ascend910B3), STAND_IN_NPU_COUNT (default 8), STAND_IN_TORCH_NPU_VERSION
(default 2.1.0.post3) and STAND_IN_NO_FUSED_SGD=1 describe the host it pretends to be.
"""

import os
import types

import torch

__version__ = os.environ.get("STAND_IN_TORCH_NPU_VERSION", "2.1.0.post3")
CHIP = os.environ.get("STAND_IN_NPU_CHIP", "Ascend910B3")
COUNT = int(os.environ.get("STAND_IN_NPU_COUNT", "8"))


class GradScaler(torch.amp.GradScaler):
    """torch_npu's scaler keeps `dynamic` in its state and reads it back on load (KeyError without
    it)."""

    def __init__(
        self,
        init_scale=2.0**16,
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=2000,
        dynamic=True,
        enabled=True,
    ):
        super().__init__(
            "cpu",
            init_scale=init_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            enabled=enabled,
        )
        self._dynamic = dynamic

    def state_dict(self):
        state = super().state_dict()
        if self._enabled:
            state["dynamic"] = self._dynamic
        return state

    def load_state_dict(self, state_dict):
        if not self._enabled:
            return
        super().load_state_dict(state_dict)
        self._dynamic = state_dict["dynamic"]


npu = types.ModuleType("torch.npu")
npu.is_available = lambda: COUNT > 0
npu.device_count = lambda: COUNT
npu.is_bf16_supported = lambda: not CHIP.startswith("Ascend910A")
npu.get_device_name = lambda device=None: CHIP
npu.set_device = lambda device: None
npu.synchronize = lambda device=None: None
npu.amp = types.SimpleNamespace(GradScaler=GradScaler)
torch.npu = npu
torch.utils.rename_privateuse1_backend(
    "npu"
)  # torch.device("npu", 0), as the real package registers it
