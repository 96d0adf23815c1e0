"""One request validated once: prompt and `<image>` rules, mode, sampling and the n-gram guard (`OcrRequest`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from PIL import Image

from config import NGRAM_DEFAULTS, Settings
from engines.base import EngineRequest, SamplingParams
from errors import BadRequest, PayloadTooLarge, ValidationFailed
from process.modes import MODES, ModeSpec

SAMPLING_EPS = 1e-5  # below vLLM's sampling epsilon a temperature means greedy


def resolve_mode(name: str | None, settings: Settings) -> ModeSpec:
    if name is None or name == "":
        return settings.default_mode
    key = name.strip().lower()
    if key not in MODES:
        raise ValidationFailed(f"mode {name!r} is not a mode; allowed: {', '.join(MODES)}")
    return MODES[key]


def normalize_prompt(prompt: str | None, default: str, *, has_image: bool, images: int = 1) -> str:
    """The prompt the model sees: the default when empty, `<image>\\n` in front when an image has no tag.
    `images` > 1: a prompt of several images, which must hold one `<image>` tag per image (422 otherwise).

    A literal backslash-n typed after `<image>` in a shell (`-F "prompt=<image>\\n..."`) means a newline.
    """
    text = (prompt or "").strip() or default
    text = text.replace("<image>\\n", "<image>\n")
    if images > 1:
        if (tags := text.count("<image>")) != images:
            raise ValidationFailed(
                f"the prompt has {tags} <image> tag(s) for {images} images; put one <image> tag in the prompt for "
                "each image, where it belongs (the images fill the tags in the order they were sent)"
            )
        return text
    if has_image and "<image>" not in text:
        text = "<image>\n" + text
    if not has_image and "<image>" in text:
        raise BadRequest("the prompt has an <image> tag but no image was sent; send an image or drop the tag")
    if text.count("<image>") > 1:
        raise BadRequest("the prompt has several <image> tags but one image was sent; send one image per tag")
    return text


def check_image_count(count: int, settings: Settings) -> None:
    """413 for a prompt of more images than MAX_IMAGES_PER_PROMPT: each adds up to ~933 tokens and a decode."""
    if count > settings.max_images_per_prompt:
        raise PayloadTooLarge(
            f"{count} images in one prompt; at most {settings.max_images_per_prompt} are allowed "
            "(MAX_IMAGES_PER_PROMPT); send the others in further requests"
        )


def fill_ngram(sent: tuple[int | None, int | None], default: tuple[int, int]) -> tuple[int, int]:
    return (sent[0] if sent[0] is not None else default[0], sent[1] if sent[1] is not None else default[1])


def check_ngram(size: int, window: int) -> None:
    if size and (size < 2 or window < size):
        raise ValidationFailed(
            f"ngram_size={size}, ngram_window={window}: the size must be 0 (off) or >= 2, "
            "and the window at least the size"
        )


@dataclass(frozen=True)
class OcrRequest:
    """What every item of one request shares, validated once before any item is touched."""

    prompt: str
    mode: ModeSpec
    sampling: SamplingParams
    model: str | None = None  # None: the default model; `OcrService.admit` binds it
    kind: str = "image"  # image, pdf or batch: picks the model's n-gram defaults when none were sent
    mode_given: bool = True
    ngram_given: bool = True
    ngram_sent: tuple[int | None, int | None] = (None, None)
    # The request's items share it: admission gives a freed engine slot to the flow with the fewest in flight.
    flow: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        prompt: str | None,
        default_prompt: str,
        has_image: bool = True,
        mode: str | ModeSpec | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        ngram: tuple[int | None, int | None] | None = None,
        model: str | None = None,
        kind: str = "image",
        images: int = 1,
    ) -> OcrRequest:
        """`ngram` parts left None take the model's defaults for `kind` when `OcrService.admit` binds it.
        `images`: how many images the prompt holds (several: one `<image>` tag each, MAX_IMAGES_PER_PROMPT)."""
        spec = mode if isinstance(mode, ModeSpec) else resolve_mode(mode, settings)
        sent = ngram if ngram is not None else (None, None)
        given = sent[0] is not None and sent[1] is not None
        ngram = fill_ngram(sent, NGRAM_DEFAULTS["ocr"][kind])
        check_image_count(images, settings)
        text = normalize_prompt(prompt, default_prompt, has_image=has_image, images=images)
        limit = settings.max_model_len
        if max_tokens is not None and not 1 <= max_tokens <= limit:
            raise ValidationFailed(f"max_tokens={max_tokens} is out of range; allowed 1..{limit} (MAX_MODEL_LEN)")
        size, window = ngram
        if given:
            check_ngram(size, window)
        sampling = SamplingParams(
            max_tokens=min(max_tokens or settings.default_max_tokens, limit),
            # Dividing logits by a subnormal temperature overflows: below the epsilon it is greedy.
            temperature=temperature if temperature >= SAMPLING_EPS else 0.0,
            top_p=top_p,
            ngram_size=size,
            ngram_window=window if size else 0,
        )
        return cls(text, spec, sampling, model or None, kind, bool(mode), given, sent)

    def engine_request(
        self, image: Image.Image | list[Image.Image] | None, *, stream: bool = False, input_hash: str | None = None
    ) -> EngineRequest:
        """`image`: a list for a prompt of several images (in tag order)."""
        sampling = SamplingParams(**vars(self.sampling))  # engines may not share one mutable object
        several = list(image) if isinstance(image, list) else []
        first = several[0] if several else image
        return EngineRequest(self.prompt, first, self.mode, sampling, stream=stream, input_hash=input_hash,  # type: ignore[arg-type]
                             more_images=several[1:])
