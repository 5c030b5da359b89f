"""Precision — the forward pass in bfloat16 where the CPU computes it natively, float32 elsewhere.

``model.precision`` chooses: ``fp32`` is the network as trained, its weights in channels-last layout
(the layout oneDNN's x86 convolutions are fastest in: 47–51 instead of 61–64 ms an image on an AVX2 VM,
issue 12) and each batch norm folded into the convolution before it (in evaluation a batch norm is a fixed
scale and shift per channel: the convolution's weights take the scale, a bias the shift, and a pass over
every activation map is saved: ≈ 8 % of the forward pass's CPU on that VM); the same float32 arithmetic,
rounded and summed in another order: logits within 1e-5 of the network as built,
``tests/inference/test_precision.py``; ``bf16`` runs the convolutions in bfloat16
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
from torch.nn.utils.fusion import fuse_conv_bn_eval

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
    """The network to run at ``precision`` (BF16 or FP32): for FP32 ``network`` itself, in evaluation mode,
    its batch norms folded into its convolutions and its weights moved to channels-last layout, in place (no
    second copy of them in memory); for BF16 a channels-last copy whose convolution weights are bfloat16
    (cast once here, not per call; batch norms and the linear head stay float32; not folded: the gain was
    measured for float32 only)."""
    if precision is Precision.AUTO:
        raise ValueError("resolve the precision first (inference.precision.resolve)")
    if precision is Precision.FP32:
        return fold_batch_norms(network.eval()).to(memory_format=torch.channels_last)
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


def fold_batch_norms(network: torch.nn.Module) -> torch.nn.Module:
    """``network`` (our ResNet-18, ``inference.network``, in evaluation mode) with each batch norm folded into
    the convolution it follows — the stem's, each block's two, each downsampling path's — in place: the convolution
    gets the norm's per-channel scale in its weights and its shift as a bias, and the norm becomes an ``Identity``.
    Folding an already folded network changes nothing. Raises ValueError for a network in training mode (its
    norms normalise by the batch, not by fixed statistics)."""
    if network.training:
        raise ValueError("batch norms fold only into a network in evaluation mode (network.eval())")
    pairs = [(network, "conv1", "bn1")]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(network, stage):
            pairs += [(block, "conv1", "bn1"), (block, "conv2", "bn2")]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    for owner, conv_name, norm_name in pairs:
        norm = getattr(owner, norm_name)
        if isinstance(norm, torch.nn.BatchNorm2d):
            setattr(owner, conv_name, fuse_conv_bn_eval(getattr(owner, conv_name), norm))
            setattr(owner, norm_name, torch.nn.Identity())
    return network
