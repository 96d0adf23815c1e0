"""The views as 8-bit values from vLLM's front end, normalised on the model's side (`engines.vllm.pixels`).

On the CPU: against the torch engine's own normalisation (`process.image_process._normalise`, the same
operations as torchvision's ToTensor + Normalize(0.5, 0.5)). Where torchvision imports (the GPU machine's kit):
against vLLM's own `ImageTransform`. Where vLLM imports: the model subclass turns 8-bit views into the
processor's values before its encoder.
"""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest
import torch
from PIL import Image

from engines.vllm import pixels
from process.image_process import _normalise


def _every_level(seed: int = 0) -> Image.Image:
    """A 32 x 24 RGB view holding each of the 256 levels in each channel, shuffled per channel."""
    rng = np.random.default_rng(seed)
    planes = [rng.permutation(np.tile(np.arange(256, dtype=np.uint8), 3)).reshape(24, 32) for _ in range(3)]
    return Image.fromarray(np.stack(planes, axis=-1), "RGB")


class _Transform:  # what install() reads of vLLM's ImageTransform
    def __init__(self, mean: tuple[float, ...] = (0.5,) * 3, std: tuple[float, ...] = (0.5,) * 3) -> None:
        self.mean, self.std, self.normalize = mean, std, True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalised_8bit_views_are_the_processors_values(dtype: torch.dtype) -> None:
    views = [_every_level(seed) for seed in range(pixels.CHUNK + 3)]  # more views than one chunk
    as_8bit = torch.stack([pixels.Uint8Views(_Transform())(v) for v in views])
    assert as_8bit.dtype == torch.uint8 and as_8bit.shape == (len(views), 3, 24, 32)
    want = torch.stack([_normalise(np.asarray(v).transpose(2, 0, 1).copy()) for v in views]).to(dtype)
    got = pixels.normalized(as_8bit, dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.unique(want.float()).numel() == 256  # every level is there, so every level matched


def test_a_view_that_is_not_rgb_is_converted() -> None:
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    got = pixels.Uint8Views(_Transform())(grey)
    assert got.shape == (3, 16, 16) and torch.equal(got[0], got[2])


def test_other_tensors_pass_unchanged() -> None:
    floats = torch.rand(2, 3, 4, 4, dtype=torch.bfloat16)
    assert pixels.normalized(floats, torch.bfloat16) is floats


def test_install_follows_the_switch_and_the_transforms_constants(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(pixels.SWITCH, raising=False)
    processor = types.SimpleNamespace(image_transform=_Transform())
    assert not pixels.install(processor) and isinstance(processor.image_transform, _Transform)  # default: float

    monkeypatch.setenv(pixels.SWITCH, "uint8")
    assert pixels.install(processor)
    installed = processor.image_transform
    assert isinstance(installed, pixels.Uint8Views) and installed.mean == (0.5,) * 3  # the padding colour kept
    assert pixels.install(processor) and processor.image_transform is installed  # idempotent

    other = types.SimpleNamespace(image_transform=_Transform(mean=(0.48, 0.46, 0.41)))
    with caplog.at_level(logging.WARNING, logger=pixels.log.name):
        assert not pixels.install(other)
    assert isinstance(other.image_transform, _Transform) and "stay float" in caplog.text


def test_empty_fields_follow_the_views_dtype() -> None:
    out = {"pixel_values": torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
           "images_crop": torch.zeros(0, 3, 4, 4, dtype=torch.bfloat16)}
    pixels.uint8_outputs(out)
    assert out["images_crop"].dtype == torch.uint8 and out["images_crop"].shape == (0, 3, 4, 4)
    floats = {"pixel_values": torch.zeros(1, 3, 8, 8), "images_crop": torch.zeros(0, 3, 4, 4)}
    pixels.uint8_outputs(floats)
    assert floats["images_crop"].dtype == torch.float32  # float views: nothing to align


def test_against_vllms_own_transform() -> None:
    pytest.importorskip("torchvision", minversion="0.1")  # the real one (its version), as the GPU kit has
    processors = pytest.importorskip("vllm.transformers_utils.processors.deepseek_ocr")
    theirs = processors.ImageTransform(mean=(0.5,) * 3, std=(0.5,) * 3, normalize=True)
    view = _every_level(7)
    want = theirs(view).unsqueeze(0).to(torch.bfloat16)
    got = pixels.normalized(pixels.Uint8Views(theirs)(view).unsqueeze(0), torch.bfloat16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("which", ["v1", "ocr2"])
def test_the_model_subclasses_normalise_8bit_views_before_the_encoder(which: str) -> None:
    pytest.importorskip("vllm.model_executor.models.deepseek_ocr2")
    if which == "v1":
        from engines.vllm.modes_model import DeepseekOCRModesForCausalLM as cls
    else:
        from engines.vllm.ocr2_model import DeepseekOCR2BatchedForCausalLM as cls
    obj = types.SimpleNamespace(view_dtype=torch.bfloat16, vision_config=types.SimpleNamespace(image_size=32))
    parse = types.MethodType(cls._parse_and_validate_image_input, obj)
    views = torch.stack([pixels.Uint8Views(_Transform())(_every_level(s).resize((32, 32))) for s in range(2)])
    tiles = torch.stack([pixels.Uint8Views(_Transform())(_every_level(s).resize((16, 16))) for s in range(4)])
    parsed = parse(pixel_values=views, images_crop=tiles, images_spatial_crop=torch.tensor([[2, 1], [2, 1]]))
    assert parsed is not None
    assert torch.equal(parsed.data, pixels.normalized(views, torch.bfloat16))
    assert torch.equal(parsed.images_crop, pixels.normalized(tiles, torch.bfloat16))
