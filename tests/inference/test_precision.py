"""The bf16 forward pass: chosen where the CPU computes bfloat16 natively, float32 outputs, and
equivalent to float32 within a stated bound on real radiographs (children's and adults')."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from config.settings import ModelSettings
from inference.classifier import Classifier, forward_pass, load_classifier, load_model, shipped_network
from inference.equivalence import compare
from inference.images import read_gray
from inference.model_card import WEIGHTS_DIR
from inference.network import build_resnet18
from inference.precision import Precision, fold_batch_norms, resolve
from inference.preprocess import to_square_uint8
from lungvision.cli import app
from tests.kit.data import CHEST_XRAY, SHARED_DATA, require

# The bound the fast path must keep against float32, image by image: the calibrated probability
# moves by at most this much, and no decision (label at the operating point, image check, gate,
# population) changes.
MAX_PROBABILITY_DIFFERENCE = 0.02
ADULTS_PER_FOLDER = 8  # adult images per folder (NORMAL, PNEUMONIA, OTHER as no pneumonia)


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ({"avx512_bf16": True, "avx2": True}, Precision.BF16),
        ({"amx_bf16": True}, Precision.BF16),
        ({"avx512_bf16": False, "amx_bf16": False, "avx2": True}, Precision.FP32),
        ({"architecture": "x86_64"}, Precision.FP32),
    ],
)
def test_auto_is_bf16_only_where_the_cpu_computes_it_natively(capabilities, expected) -> None:
    assert resolve("auto", capabilities) is expected
    assert resolve(Precision.FP32, {"amx_bf16": True}) is Precision.FP32  # an explicit choice is kept
    assert resolve("bf16", {}) is Precision.BF16
    with pytest.raises(ValueError):
        resolve("int8", {})


def test_this_cpu_resolves_auto_with_torch_capabilities() -> None:
    capabilities = torch.cpu.get_capabilities()
    native = bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    assert resolve("auto") is (Precision.BF16 if native else Precision.FP32)


def test_the_setting_chooses_the_precision() -> None:
    assert ModelSettings().precision == "auto"
    classifier, _ = load_model(ModelSettings(precision="fp32"))
    assert classifier.precision is Precision.FP32
    assert load_model(ModelSettings())[0].precision is resolve("auto")


def _squares(count: int = 6) -> np.ndarray:
    val = require(CHEST_XRAY / "val")
    paths = [path for name in ("NORMAL", "PNEUMONIA") for path in sorted((val / name).glob("*.jpeg"))[: count // 2]]
    return np.stack([to_square_uint8(read_gray(path)) for path in paths])


def test_fp32_runs_the_network_as_trained_folded_in_channels_last_layout() -> None:
    """The same weights and float32 arithmetic as the network as built (contiguous layout, batch norms of their
    own), rounded and summed in another order: equal within float32 rounding, and the same from one instance
    to the next."""
    classifier = load_classifier(precision=Precision.FP32)
    squares = _squares()
    output = classifier.forward(squares)
    assert classifier.network.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in classifier.network.modules())
    as_built = shipped_network(WEIGHTS_DIR, classifier.card)
    assert not as_built.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    plain = forward_pass(as_built.eval(), torch.from_numpy(squares)[:, None], classifier.card.input_size)
    assert torch.allclose(output.logits, plain.logits, rtol=0, atol=1e-5)
    assert torch.allclose(output.features, plain.features, rtol=1e-5, atol=1e-5)
    assert torch.allclose(output.cams, plain.cams, rtol=1e-5, atol=1e-5)
    fresh = Classifier(precision="fp32").forward(squares)  # a second instance: nothing left over from the first
    assert torch.equal(fresh.logits, output.logits) and torch.equal(fresh.features, output.features)
    assert torch.equal(fresh.cams, output.cams)


def test_folding_batch_norms_keeps_the_outputs_and_is_done_once() -> None:
    network = build_resnet18()
    with torch.no_grad():  # batch norms that do something: other statistics, scales and shifts than 0 and 1
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.5)
    with pytest.raises(ValueError, match="evaluation mode"):
        fold_batch_norms(network.train())
    inputs = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        expected = network.eval()(inputs)
        folded = fold_batch_norms(network)
        assert folded is network and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert torch.allclose(folded(inputs), expected, rtol=1e-4, atol=1e-5)
        weights = folded.layer4[1].conv2.weight.clone()
        assert torch.equal(fold_batch_norms(folded).layer4[1].conv2.weight, weights)  # a second fold: no change


def test_bf16_outputs_are_float32_and_leave_the_fp32_network_alone() -> None:
    fast = load_classifier(precision=Precision.BF16)
    output = fast.forward(_squares())
    assert {output.logits.dtype, output.cams.dtype, output.features.dtype} == {torch.float32}
    assert all(parameter.dtype == torch.float32 for parameter in fast.network.parameters())
    prediction = fast.predict([np.random.default_rng(0).random((120, 100), dtype=np.float32)])[0]
    assert prediction.heatmap.dtype == np.float32 and isinstance(prediction.probability, float)


@pytest.fixture(scope="module")
def children_and_adults(tmp_path_factory) -> Path:
    """The 16 images of the children's validation split and 24 adult images (8 each of NORMAL, OTHER
    as NORMAL, PNEUMONIA), linked into one NORMAL/ PNEUMONIA/ folder."""
    folder = tmp_path_factory.mktemp("children-and-adults")
    adults = require(SHARED_DATA / "adult_cxr" / "train")
    children = [
        (path, path.parent.name)
        for name in ("NORMAL", "PNEUMONIA")
        for path in sorted(require(CHEST_XRAY / "val" / name).glob("*.jpeg"))
    ]
    grown_up = [
        (path, "PNEUMONIA" if name == "PNEUMONIA" else "NORMAL")
        for name in ("NORMAL", "OTHER", "PNEUMONIA")
        for path in sorted((adults / name).glob("*.jpg"))[::50][:ADULTS_PER_FOLDER]
    ]
    for path, label in children + grown_up:
        (folder / label).mkdir(exist_ok=True)
        (folder / label / f"{path.parent.name}-{path.name}").symlink_to(path)
    return folder


def test_bf16_agrees_with_fp32_within_the_bound(children_and_adults) -> None:
    reference, fast = load_classifier(precision=Precision.FP32), load_classifier(precision=Precision.BF16)
    result = compare(children_and_adults, reference, fast, reference.intended_use(), seconds=0.1)
    assert result.n == 16 + 3 * ADULTS_PER_FOLDER
    assert result.max_abs_difference <= MAX_PROBABILITY_DIFFERENCE, result
    assert result.label_flips == [] and result.image_check_flips == [] and result.gate_flips == []
    assert result.population_flips == []
    assert result.reference.accepted == result.fast.accepted
    assert result.fast.sensitivity == result.reference.sensitivity
    assert result.fast.specificity == result.reference.specificity
    assert abs(result.fast.roc_auc - result.reference.roc_auc) <= 0.01


def test_a_path_that_is_not_equivalent_is_caught() -> None:
    """The comparison can fail: a 'fast' path whose logits are 2 off is beyond the bound and flips labels."""
    reference = load_classifier(precision=Precision.FP32)
    shifted = Classifier(precision=Precision.BF16)
    forward = shifted.forward
    shifted.forward = lambda squares: dataclasses.replace(forward(squares), logits=forward(squares).logits + 2.0)
    result = compare(require(CHEST_XRAY / "val"), reference, shifted, reference.intended_use(), seconds=0.1)
    assert result.max_abs_difference > MAX_PROBABILITY_DIFFERENCE and result.label_flips


def test_equivalence_command_reports_the_figures(tmp_path) -> None:
    out = tmp_path / "equivalence.json"
    result = CliRunner().invoke(
        app, ["equivalence", "--data", str(require(CHEST_XRAY / "val")), "--out", str(out), "--seconds", "0.2"]
    )
    assert result.exit_code == 0, result.output
    for words in (
        "max \\|Δprobability\\|",
        "label flips",
        "image-check verdict flips",
        "gate flips",
        "population flips",
        "roc_auc",
        "sensitivity",
        "specificity",
        "images/s",
    ):
        assert words in result.output, words
    figures = json.loads(out.read_text())
    assert figures["n"] == 16 and figures["reference"]["precision"] == "fp32" and figures["fast"]["precision"] == "bf16"
    assert figures["speed_ratio"] > 0
