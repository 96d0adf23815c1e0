"""The DeepSeek-OCR encoder over a whole batch (`engines.vllm.encoder_batch`) against image-after-image encoding.

On the CPU: against our model's per-image `encode_image` (tiny vision, random weights). Where vLLM imports
(the GPU machine): against vLLM 0.26's own per-image loop (`DeepseekOCRForCausalLM._pixel_values_to_embedding`
and its helpers), run over the same modules.
"""

from __future__ import annotations

import types

import pytest
import torch

import deepseek_ocr as dso
from engines.vllm import encoder_batch
from process.image_process import ImageInputs
from tiny_checkpoint import random_init_, tiny_config

BASE, TILE = 256, 128  # small sides keep the CPU encoder fast (4x4 and 2x2 feature grids)
GRIDS = [(3, 2), (1, 1), (2, 3), (1, 1), (2, 1)]  # (wide, high): tiled, untiled, tall, untiled, two tiles


@pytest.fixture(scope="module")
def model() -> dso.DeepseekOCRModel:
    cfg = dso.DeepseekOCRConfig.from_dict(tiny_config())
    # float64: batching changes the summation order of the matrix products; in float64 that stays far below
    # the tolerance, so any layout difference (a swapped tile, a missing newline) shows
    return random_init_(dso.DeepseekOCRModel(cfg), seed=3, std=0.2).double().eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    global_views = torch.rand(len(GRIDS), 3, BASE, BASE, generator=gen, dtype=torch.float64) * 2 - 1
    count = sum(w * h for w, h in GRIDS if w * h > 1)
    return global_views, torch.rand(count, 3, TILE, TILE, generator=gen, dtype=torch.float64) * 2 - 1


def _bound(modules: dict, cls: type, names: tuple[str, ...]) -> types.SimpleNamespace:
    """An object holding `modules` with `cls`'s methods `names` bound to it (a model without vLLM's engine)."""
    obj = types.SimpleNamespace(**modules)
    for name in names:
        setattr(obj, name, types.MethodType(getattr(cls, name), obj))
    return obj


def _same_embeddings(theirs: object, ours: object, global_views: torch.Tensor, tiles: torch.Tensor,
                     grids: list[tuple[int, int]]) -> None:
    with torch.no_grad():
        want = theirs._pixel_values_to_embedding(global_views, tiles, torch.tensor(grids))  # type: ignore[attr-defined]
        got = ours._pixel_values_to_embedding(global_views, tiles, torch.tensor(grids))  # type: ignore[attr-defined]
    assert len(want) == len(got) == len(grids)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def _project(model: dso.DeepseekOCRModel):  # noqa: ANN202
    return lambda views: model.view_features(views).flatten(1, 2)


def _per_image(model: dso.DeepseekOCRModel, global_views: torch.Tensor, tiles: torch.Tensor) -> list[torch.Tensor]:
    out, start = [], 0
    for (w, h), view in zip(GRIDS, global_views, strict=True):
        count = w * h if w * h > 1 else 0
        image = ImageInputs(global_view=view, tiles=tiles[start:start + count] if count else None, grid=(w, h),
                            base_size=BASE, image_size=TILE, image_tokens=0)
        start += count
        out.append(model.encode_image(image))
    return out


@pytest.mark.parametrize("budget", [encoder_batch.VIEW_BUDGET, 1])  # 1: every view in a call of its own
def test_the_batch_gives_each_image_what_our_per_image_encoder_gives(model: dso.DeepseekOCRModel, budget: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoder_batch, "VIEW_BUDGET", budget)
    global_views, tiles = _inputs()
    calls: list[int] = []
    project = _project(model)

    def counted(views: torch.Tensor) -> torch.Tensor:
        calls.append(views.shape[0])
        return project(views)

    with torch.no_grad():
        batched = encoder_batch.image_embeddings(counted, global_views, tiles, GRIDS, model.image_newline,
                                                 model.view_seperator)
        expected = _per_image(model, global_views, tiles)
    # one call for the five global views and one for the 14 tiles, or one a view
    assert calls == ([5, 14] if budget > 1 else [1] * 19)
    assert [e.shape for e in batched] == [e.shape for e in expected]
    # the token count the prompt's placeholders follow: tile rows x (columns + newline), the same for the
    # global view, and the separator
    q, qb = TILE // 64, BASE // 64
    for (w, h), got in zip(GRIDS, batched, strict=True):
        tiled = w * h > 1
        assert got.shape[0] == (h * q * (w * q + 1) if tiled else 0) + qb * (qb + 1) + 1
    for got, want in zip(batched, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_a_batch_without_tiles_encodes_no_tiles(model: dso.DeepseekOCRModel) -> None:
    global_views, _ = _inputs()
    calls: list[int] = []
    project = _project(model)
    with torch.no_grad():
        no_tiles = torch.zeros(0, 3, TILE, TILE, dtype=torch.float64)
        out = encoder_batch.image_embeddings(lambda v: calls.append(v.shape[0]) or project(v), global_views[:2],
                                             no_tiles, [(1, 1), (1, 1)], model.image_newline, model.view_seperator)
    assert calls == [2]
    assert [o.shape[0] for o in out] == [(BASE // 64) * (BASE // 64 + 1) + 1] * 2


def test_views_per_call_follows_the_attention_budget() -> None:
    assert [encoder_batch.views_per_call(s) for s in (512, 640, 1024, 1280)] == [128, 52, 8, 3]
    assert encoder_batch.views_per_call(4096) == 1  # never fewer than one view a call


def test_tile_counts_that_do_not_match_the_grids_are_refused(model: dso.DeepseekOCRModel) -> None:
    global_views, tiles = _inputs()
    project = _project(model)
    with pytest.raises(ValueError, match="13 tiles for grids"):
        encoder_batch.image_embeddings(project, global_views, tiles[:13], GRIDS, model.image_newline,
                                       model.view_seperator)
    with pytest.raises(ValueError, match="5 global views for 4 tile grids"):
        encoder_batch.image_embeddings(project, global_views, tiles, GRIDS[:4], model.image_newline,
                                       model.view_seperator)


def test_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(encoder_batch.SWITCH, raising=False)
    assert encoder_batch.enabled()
    monkeypatch.setenv(encoder_batch.SWITCH, "vllm")
    assert not encoder_batch.enabled()


def test_the_batch_lays_out_what_vllms_own_loop_lays_out(model: dso.DeepseekOCRModel) -> None:
    """vLLM 0.26's per-image methods against the service's subclass (`DeepseekOCRModesForCausalLM`), both bound
    to our modules (vLLM's `vision_model` takes the pixels and SAM's features; ours SAM's features alone)."""
    vllm_ocr = pytest.importorskip("vllm.model_executor.models.deepseek_ocr")
    cls = vllm_ocr.DeepseekOCRForCausalLM
    modes_model = pytest.importorskip("engines.vllm.modes_model")
    modules = {"sam_model": model.sam_model, "vision_model": lambda px, sam: model.vision_model(sam),
               "projector": model.projector, "image_newline": model.image_newline,
               "view_seperator": model.view_seperator}
    theirs = _bound(modules, cls, ("_encode_global_features", "_encode_local_features", "_assemble_patch_grid",
                                   "_pixel_values_to_embedding"))
    ours = _bound(modules, modes_model.DeepseekOCRModesForCausalLM, ("_project_views", "_pixel_values_to_embedding"))
    _same_embeddings(theirs, ours, *_inputs(), GRIDS)


# DeepSeek-OCR-2: 1024 px global views and 768 px tiles (the only sizes its learned queries exist for)
OCR2_GRIDS = [(2, 1), (1, 1)]


@pytest.fixture(scope="module")
def model2() -> dso.DeepseekOCRModel:
    cfg = dso.DeepseekOCRConfig.from_dict(tiny_config(arch="ocr2"))
    return random_init_(dso.DeepseekOCRModel(cfg), seed=5, std=0.2).double().eval()


def _ocr2_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    global_views = torch.rand(len(OCR2_GRIDS), 3, 1024, 1024, generator=gen, dtype=torch.float64) * 2 - 1
    count = sum(w * h for w, h in OCR2_GRIDS if w * h > 1)
    return global_views, torch.rand(count, 3, 768, 768, generator=gen, dtype=torch.float64) * 2 - 1


def test_ocr2_the_batch_gives_each_image_what_our_per_image_encoder_gives(model2: dso.DeepseekOCRModel) -> None:
    global_views, tiles = _ocr2_inputs()
    calls: list[int] = []

    def counted(views: torch.Tensor) -> torch.Tensor:
        calls.append(views.shape[0])
        return model2.query_features(views)

    with torch.no_grad():
        batched = encoder_batch.image_embeddings(counted, global_views, tiles, OCR2_GRIDS, None,
                                                 model2.view_seperator)
        expected, start = [], 0
        for (w, h), view in zip(OCR2_GRIDS, global_views, strict=True):
            count = w * h if w * h > 1 else 0
            expected.append(model2.encode_image(ImageInputs(
                global_view=view, tiles=tiles[start:start + count] if count else None, grid=(w, h),
                base_size=1024, image_size=768, image_tokens=0)))
            start += count
    assert calls == [2, 2]
    # 144 queries a tile, 256 for the global view, one separator; no newlines
    assert [e.shape[0] for e in batched] == [2 * 144 + 257, 257]
    for got, want in zip(batched, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_ocr2_the_batch_lays_out_what_vllms_own_loop_lays_out(model2: dso.DeepseekOCRModel) -> None:
    """vLLM 0.26's DeepSeek-OCR-2 per-image methods against the service's subclass
    (`engines.vllm.ocr2_model`), both bound to our modules."""
    vllm_ocr2 = pytest.importorskip("vllm.model_executor.models.deepseek_ocr2")
    ocr2_model = pytest.importorskip("engines.vllm.ocr2_model")
    modules = {"sam_model": model2.sam_model, "qwen2_model": model2.qwen2_model, "projector": model2.projector,
               "view_seperator": model2.view_seperator}
    theirs = _bound(modules, vllm_ocr2.DeepseekOCR2ForCausalLM,
                    ("_encode_global_features", "_encode_local_features", "_pixel_values_to_embedding"))
    ours = _bound(modules, ocr2_model.DeepseekOCR2BatchedForCausalLM,
                  ("_project_views", "_pixel_values_to_embedding", "_encode_local_features"))
    _same_embeddings(theirs, ours, *_ocr2_inputs(), OCR2_GRIDS)


def test_ocr2_a_view_whose_pixels_sum_to_zero_is_still_an_image() -> None:
    """vLLM's DeepSeek-OCR-2 took `torch.sum(pixels) == 0` for "no image" (a half-black, half-white view): the
    engine core then died on the missing embeddings. The subclass decides by the tensors' sizes."""
    ocr2_model = pytest.importorskip("engines.vllm.ocr2_model")
    obj = _bound({"vision_config": types.SimpleNamespace(image_size=1024), "view_dtype": torch.float32},
                 ocr2_model.DeepseekOCR2BatchedForCausalLM, ("_parse_and_validate_image_input",))
    half = torch.cat([-torch.ones(1, 3, 1024, 512), torch.ones(1, 3, 1024, 512)], dim=-1)
    assert float(half.sum()) == 0.0
    parsed = obj._parse_and_validate_image_input(pixel_values=half, images_crop=torch.zeros(0, 3, 768, 768),
                                                 images_spatial_crop=torch.tensor([[1, 1]]))
    assert parsed is not None and parsed.data is half
    assert obj._parse_and_validate_image_input(pixel_values=None) is None
    vllm_ocr2 = pytest.importorskip("vllm.model_executor.models.deepseek_ocr2")
    stock = _bound({"vision_config": types.SimpleNamespace(image_size=1024)}, vllm_ocr2.DeepseekOCR2ForCausalLM,
                   ("_parse_and_validate_image_input",))
    assert stock._parse_and_validate_image_input(pixel_values=half) is None  # vLLM's own: "no image"


def test_image_tensors_decides_by_sizes_not_by_a_pixel_sum() -> None:
    half = torch.cat([-torch.ones(1, 3, 8, 4), torch.ones(1, 3, 8, 4)], dim=-1)  # sums to exactly 0
    crops, grid = torch.zeros(0, 3, 4, 4), torch.tensor([[1, 1]])
    kwargs: dict[str, object] = {"pixel_values": half, "images_crop": crops, "images_spatial_crop": grid, "x": 1}
    got = encoder_batch.image_tensors(kwargs, "m", torch.float32)
    assert got is not None and [a is b for a, b in zip(got, (half, crops, grid), strict=True)] == [True] * 3
    assert kwargs == {"x": 1}  # the image fields are taken out, the rest left
    assert encoder_batch.image_tensors({"pixel_values": None}, "m", torch.float32) is None
    assert encoder_batch.image_tensors({"pixel_values": torch.zeros(0, 3, 8, 8), "images_crop": crops}, "m",
                                      torch.float32) is None
    with pytest.raises(ValueError, match="m image inputs are not one tensor each"):
        encoder_batch.image_tensors({"pixel_values": [half], "images_crop": crops}, "m", torch.float32)


@pytest.mark.parametrize("which", ["v1", "ocr2"])
def test_the_tile_grids_stay_on_the_host_while_the_batch_encoder_is_on(which: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Both models' registered processors mark `images_spatial_crop` keep-on-CPU (the batch encoder reads the
    grids with `.tolist()`, which would wait for the GPU), and leave vLLM's fields as they are with the switch
    off. The registered processor is the one vLLM builds for the model class."""
    pytest.importorskip("vllm.model_executor.models.deepseek_ocr2")
    if which == "v1":
        from engines.vllm.modes_model import DeepseekOCRModesForCausalLM as cls
        from engines.vllm.modes_model import ModesMultiModalProcessor as processor
    else:
        from engines.vllm.ocr2_model import DeepseekOCR2BatchedForCausalLM as cls
        from engines.vllm.ocr2_model import Ocr2MultiModalProcessor as processor
    assert cls._processor_factory.processor is processor
    made = object.__new__(processor)  # the fields config reads only its arguments
    inputs = {"pixel_values": torch.zeros(2, 3, 8, 8), "images_spatial_crop": torch.tensor([[2, 1], [1, 1]])}

    def grid_on_cpu() -> bool:
        return made._get_mm_fields_config(inputs, {})["images_spatial_crop"].field.keep_on_cpu

    monkeypatch.delenv(encoder_batch.SWITCH, raising=False)
    assert grid_on_cpu()
    monkeypatch.setenv(encoder_batch.SWITCH, "vllm")
    assert not grid_on_cpu()


@pytest.mark.parametrize("which", ["v1", "ocr2"])
def test_vllm_builds_the_subclasses_with_its_config(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM 0.26's `initialize_model` passes `vllm_config` and `prefix` only to a class whose `__init__`
    signature names both; otherwise it guesses old-style arguments and the constructor fails (an engine that
    never started on the GPU, docs/BENCHMARKS.md section 27). Its rule, and then a construction through
    the signature it reads, with the parent's constructor recording what it got."""
    import inspect

    pytest.importorskip("vllm.model_executor.models.deepseek_ocr2")
    if which == "v1":
        from engines.vllm.modes_model import DeepseekOCRModesForCausalLM as cls
    else:
        from engines.vllm.ocr2_model import DeepseekOCR2BatchedForCausalLM as cls
    params = inspect.signature(cls.__init__).parameters
    assert "vllm_config" in params and "prefix" in params
    got: dict[str, object] = {}
    monkeypatch.setattr(cls.__mro__[1], "__init__",
                        lambda self, *, vllm_config, prefix="": got.update(config=vllm_config, prefix=prefix))
    config = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=torch.bfloat16))
    model = cls(vllm_config=config, prefix="model")
    assert got == {"config": config, "prefix": "model"}
    assert model.view_dtype == torch.bfloat16  # what 8-bit views are normalised into (engines.vllm.pixels)
