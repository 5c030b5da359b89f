"""Precision — the forward pass in bfloat16 where the CPU computes it natively, float32 elsewhere.

``model.precision`` chooses: ``fp32`` is the network as trained, its weights in channels-last layout
(the layout oneDNN's x86 convolutions are fastest in: 47–51 instead of 61–64 ms an image on an AVX2 VM,
issue 12; the same float32 arithmetic, summed in another order: logits within 1e-6 of the contiguous
network's, ``tests/inference/test_precision.py``); ``bf16`` runs the convolutions in bfloat16
(channels-last too, the convolution weights stored in bfloat16 once, ``torch.autocast`` for the
activations); ``auto`` (the default) is ``bf16`` on a CPU with native bfloat16 arithmetic
(x86 AVX512-BF16 or AMX-BF16, as ``torch.cpu.get_capabilities`` reports them), else ``fp32``.
Whatever the precision, the outputs — logits, class maps, pooled features — come back as float32,
and the logits are computed from the float32 pooled features, so only the backbone is rounded.

That the bf16 path is equivalent is shown, not assumed: ``lungvision equivalence`` compares it with
fp32 on a labelled folder (``inference/equivalence.py``), and ``tests/inference/test_precision.py`` fails when
it disagrees beyond a stated bound.
"""

import contextlib
import copy
from collections.abc import Mapping
from enum import Enum

import torch

# the capabilities (torch.cpu.get_capabilities keys) that make bfloat16 convolutions faster than float32;
# only x86 is listed: it is where the speed was measured (ARM's "bf16" may be set explicitly)
NATIVE_BF16 = ("amx_bf16", "avx512_bf16")


class Precision(str, Enum):
    """The arithmetic of the forward pass (``model.precision``)."""

    AUTO = "auto"  # BF16 where the CPU has native bfloat16 arithmetic, else FP32
    BF16 = "bf16"
    FP32 = "fp32"


def cpu_has_native_bf16(capabilities: Mapping[str, object] | None = None) -> bool:
    """Whether the CPU (``capabilities``: as ``torch.cpu.get_capabilities()`` reports them) computes
    bfloat16 natively."""
    capabilities = torch.cpu.get_capabilities() if capabilities is None else capabilities
    return any(bool(capabilities.get(name, False)) for name in NATIVE_BF16)


def resolve(precision: Precision | str, capabilities: Mapping[str, object] | None = None) -> Precision:
    """The precision to run: ``BF16`` or ``FP32`` (``AUTO`` resolved for this CPU, or ``capabilities``)."""
    precision = Precision(precision)
    if precision is Precision.AUTO:
        return Precision.BF16 if cpu_has_native_bf16(capabilities) else Precision.FP32
    return precision


def network_for(network: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """The network to run at ``precision`` (BF16 or FP32): for FP32 ``network`` itself, its weights moved to
    channels-last layout in place (no second copy of them in memory); for BF16 a channels-last copy whose
    convolution weights are bfloat16 (cast once here, not per call; batch norms and the linear head stay
    float32)."""
    if precision is Precision.AUTO:
        raise ValueError("resolve the precision first (inference.precision.resolve)")
    if precision is Precision.FP32:
        return network.to(memory_format=torch.channels_last)
    fast = copy.deepcopy(network).to(memory_format=torch.channels_last)
    for module in fast.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.to(torch.bfloat16)
    return fast


def prepared_input(inputs: torch.Tensor, precision: Precision) -> torch.Tensor:
    """A standardised N×1×H×W float batch in the layout the network at any ``precision`` runs in (channels last)."""
    return inputs.contiguous(memory_format=torch.channels_last)


def autocast(precision: Precision) -> contextlib.AbstractContextManager:
    """The context to run the network at ``precision`` in (nothing for FP32)."""
    if precision is Precision.FP32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)
