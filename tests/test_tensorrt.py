"""TensorRT: version-dependent build plans (pure python, always run); real engine builds only where
TensorRT and a GPU are present, otherwise skipped with the reason."""
import re

import pytest
import torch

from polarprune.export.tensorrt_build import (BatchProfile, EngineError, batch_profile, major_version, plan_build,
                                   unavailable_reason)

REASON = unavailable_reason()


def test_major_version_parsing():
    assert major_version("10.7.0.post1") == 10
    assert major_version("11.0.0") == 11
    with pytest.raises(EngineError):
        major_version("unknown")


def test_tensorrt_10_uses_the_fp16_builder_flag():
    plan = plan_build("10.9.0", want_fp16=True, fp16_converter_installed=False)
    assert (plan.precision, plan.fp16_builder_flag, plan.fp16_onnx) == ("fp16", True, False)


def test_tensorrt_11_takes_fp16_only_from_an_fp16_onnx():
    converted = plan_build("11.1.0", want_fp16=True, fp16_converter_installed=True)
    assert (converted.precision, converted.fp16_builder_flag, converted.fp16_onnx) == ("fp16", False, True)
    # Without the converter TensorRT 11 would build FP32 silently: the request is refused, naming both ways out.
    with pytest.raises(EngineError, match=r"nvidia-modelopt.*--engine-fp32"):
        plan_build("11.1.0", want_fp16=True, fp16_converter_installed=False)


def test_fp32_requested_and_too_old_versions():
    for version in ("10.0.1", "11.0.0"):
        plan = plan_build(version, want_fp16=False, fp16_converter_installed=True)
        assert (plan.precision, plan.fp16_builder_flag, plan.fp16_onnx) == ("fp32", False, False)
    with pytest.raises(EngineError, match="older than 10"):
        plan_build("8.6.1", want_fp16=True, fp16_converter_installed=False)


def test_batch_profile_covers_triton_batches():
    assert batch_profile(64) == BatchProfile(1, 32, 64)
    assert batch_profile(64, opt=8, maximum=128) == BatchProfile(1, 8, 128)
    with pytest.raises(EngineError, match="below the Triton max_batch_size"):
        batch_profile(64, maximum=32)
    with pytest.raises(EngineError, match="opt batch"):
        batch_profile(8, opt=16)


def test_unavailability_is_explained():
    if REASON is None:
        pytest.skip("TensorRT and a GPU are present")
    assert isinstance(REASON, str) and REASON and "\n" not in REASON


@pytest.mark.skipif(REASON is not None, reason=f"no TensorRT engine here: {REASON}")
def test_engine_matches_onnxruntime(tmp_path):
    import tensorrt

    from polarprune.export.onnx_export import export_onnx
    from polarprune.export.surgery import prune
    from polarprune.export.tensorrt_build import build_and_check, build_facts, fp16_converter_installed
    from export_fixtures import trained_model

    model, mask, document, graph = trained_model("resnet20", (16, 16), seed=0, closed_blocks=["layer2.0"])
    pruned = prune(model.plain(), graph, mask).pruned
    export_onnx(pruned, tmp_path / "pruned.onnx", (1, 16, 16))
    want_fp16 = major_version(tensorrt.__version__) == 10 or fp16_converter_installed()
    plan = plan_build(tensorrt.__version__, want_fp16, fp16_converter_installed())
    profile = batch_profile(8)
    images = torch.randn(20, 1, 16, 16).numpy()
    result = build_and_check(tmp_path / "pruned.onnx", tmp_path / "pruned.plan", images, profile, plan,
                             tmp_path / "timing.cache", 1 << 28)
    assert (tmp_path / "pruned.plan").stat().st_size > 0 and (tmp_path / "timing.cache").is_file()
    assert result["top1_agreement"] >= 0.9 and result["tolerance"] == (5e-2 if want_fp16 else 1e-2)
    facts = build_facts()
    assert facts["tensorrt_version"] == tensorrt.__version__
    assert re.fullmatch(r"\d+\.\d+", facts["compute_capability"])
