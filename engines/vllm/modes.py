"""Every DeepSeek-OCR resolution mode per request on one vLLM engine: a vLLM plugin, not a fork.

vLLM 0.26 counts a DeepSeek-OCR image's placeholders from module constants (Gundam: 1024 / 640 / crop), so
out of the box one engine serves one mode (vLLM issue #28160). Its processor itself takes `image_size`,
`base_size` and `crop_mode` per request (`mm_processor_kwargs` reach `get_hf_processor(**kwargs)` and the
processor's `__call__`), and its model takes the view sizes from the pixel tensors. What is missing is a
placeholder count from the request's sizes, and an encoder batch that never mixes modes (vLLM pads crops of
different sizes into one tensor with zeros). `engines.vllm.modes_model` adds both by subclassing vLLM's
DeepSeek-OCR classes; `register()` puts its model class in place of the built-in `DeepseekOCRForCausalLM`
(`DeepseekOCR2ForCausalLM` gets `engines.vllm.ocr2_model`'s subclass of vLLM's class, which keeps vLLM's
processor and one mode: its encoder runs over the whole batch; its encoder's mask is built by
`engines.vllm.ocr2_encoder`, which `register()` also puts in place). Both models' SAM gets its attention from
`engines.vllm.sam_attention` (the relative positions without a bias tensor), also put in place here.

vLLM spawns its engine core (and tensor-parallel workers) as new processes, so registering here is not
enough: each vLLM process loads the entry points of group `vllm.general_plugins` on start-up
(`vllm.plugins.load_general_plugins`, called in `EngineCore.__init__`, in workers and in the model-registry
probe subprocess). `install_plugin()` writes a minimal distribution metadata directory whose entry point is
`engines.vllm.modes:register`, puts its folder and the repository root on `sys.path` (copied into spawned
children) and `PYTHONPATH` (seen by `subprocess` children), and registers in this process too. A process
spawned by multiprocessing that registers leaves a mark (`children_registered`), so the engine can refuse to
start when its engine core did not load the plugin: vLLM only logs a plugin that fails to load.

This module imports no vLLM at import time (the CPU test suite has none): `ViewSizes`, `count_placeholders`
and the dist-info writer are plain Python; `register()` imports vLLM when it runs.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from process.modes import ModeSpec

ROOT = Path(__file__).resolve().parents[2]  # the repository root (engines/vllm/modes.py)
ARCHITECTURE = "DeepseekOCRForCausalLM"  # the checkpoint's architecture; OCR-2's is another name
MODEL_CLASS = "engines.vllm.modes_model:DeepseekOCRModesForCausalLM"
# DeepSeek-OCR-2 (vLLM's class, with the encoder over the whole batch and no pixel-sum checks)
OCR2_ARCHITECTURE = "DeepseekOCR2ForCausalLM"
OCR2_MODEL_CLASS = "engines.vllm.ocr2_model:DeepseekOCR2BatchedForCausalLM"
PLUGIN_NAME = "deepseek_ocr_modes"  # the entry point's name: what VLLM_PLUGINS must list when it is set
PLUGIN_GROUP = "vllm.general_plugins"
# Its own distribution name: importlib.metadata keeps one distribution per name, so sharing the project's
# name with an installed copy of the project could hide this entry point.
DIST_NAME = "deepseek_ocr_service_vllm_modes"
DIST_VERSION = "1.0"
PLUGIN_DIR_ENV = "DEEPSEEK_OCR_VLLM_PLUGIN_DIR"
_MARKS = "registered"  # <plugin dir>/registered/<parent pid>-<pid>: which spawned processes registered
_MARK_MAX_AGE_S = 24 * 3600

# View sizes must be whole multiples of one query (16 px patches, 4x downsampling): there vLLM's
# ceil((size // 16) / 4) and our ceil(size / 64) agree.
_SIZE_STEP = 64

GridFn = Callable[[int, int, int], tuple[int, int]]  # (width, height, image_size) -> (tiles wide, tiles high)


@dataclass(frozen=True)
class ViewSizes:
    """A request's views: the global view's side, the tile side, and whether images over a tile are tiled."""

    base_size: int
    image_size: int
    crop: bool

    @classmethod
    def for_mode(cls, mode: ModeSpec) -> ViewSizes:
        return cls(mode.base_size, mode.image_size, mode.crop)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, object]) -> ViewSizes:
        """The sizes named by a request's `mm_processor_kwargs`; Gundam's for any that is missing.

        ValueError (vLLM turns it into a refused request) for sizes the model cannot take.
        """
        base = kwargs.get("base_size", GUNDAM.base_size)
        image = kwargs.get("image_size", GUNDAM.image_size)
        crop = kwargs.get("crop_mode", GUNDAM.crop)
        for name, value in (("base_size", base), ("image_size", image)):
            if not isinstance(value, int) or isinstance(value, bool) or value < _SIZE_STEP or value % _SIZE_STEP:
                raise ValueError(f"{name} must be a positive multiple of {_SIZE_STEP}, got {value!r}")
        if not isinstance(crop, bool):
            raise ValueError(f"crop_mode must be true or false, got {crop!r}")
        return cls(base, image, crop)  # type: ignore[arg-type]  # checked above

    def as_kwargs(self) -> dict[str, object]:
        """The `mm_processor_kwargs` of a request in these sizes (names of vLLM's DeepseekOCRProcessor)."""
        return {"image_size": self.image_size, "base_size": self.base_size, "crop_mode": self.crop}

    def as_list(self) -> list[int]:
        """What rides with each encoder item so that items of different sizes are never batched together."""
        return [self.base_size, self.image_size, int(self.crop)]


GUNDAM = ViewSizes(1024, 640, True)  # vLLM's module defaults (BASE_SIZE, IMAGE_SIZE, CROP_MODE)


def mode_kwargs(mode: ModeSpec) -> dict[str, object]:
    """Per-request `mm_processor_kwargs` for a DeepSeek-OCR mode."""
    return ViewSizes.for_mode(mode).as_kwargs()


def count_placeholders(width: int, height: int, sizes: ViewSizes, grid: GridFn) -> int:
    """`<image>` placeholders of a width x height image in `sizes`: what vLLM's model will embed.

    The global view gives q_b rows of q_b + 1 (each row ends with a newline embedding), the tiles (only in
    crop mode for an image over one tile, and only for a grid other than 1x1) q_i * th rows of q_i * tw + 1,
    then one view separator. `grid` picks the tiling; the plugin passes vLLM's own (`count_tiles`), which is
    also what its processor cuts the tiles with.
    """
    q_base = -(-sizes.base_size // _SIZE_STEP)
    tokens = q_base * (q_base + 1) + 1
    if sizes.crop and (width > sizes.image_size or height > sizes.image_size):
        tiles_wide, tiles_high = grid(width, height, sizes.image_size)
        if (tiles_wide, tiles_high) != (1, 1):
            q_tile = -(-sizes.image_size // _SIZE_STEP)
            tokens += q_tile * tiles_high * (q_tile * tiles_wide + 1)
    return tokens


# --------------------------------------------------------------------------------------- the plugin


def plugin_dir() -> Path:
    """Where the plugin's metadata lives: $DEEPSEEK_OCR_VLLM_PLUGIN_DIR, else a per-user temp folder."""
    given = os.environ.get(PLUGIN_DIR_ENV)
    if given:
        return Path(given)
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"deepseek-ocr-vllm-plugin-{user}"


def write_dist_info(directory: Path) -> Path:
    """Write `<directory>/<dist>-<ver>.dist-info/` (METADATA, entry_points.txt); idempotent, atomic per file.

    With `directory` on `sys.path`, `importlib.metadata.entry_points(group="vllm.general_plugins")` lists
    `deepseek_ocr_modes = engines.vllm.modes:register`.
    """
    info = directory / f"{DIST_NAME}-{DIST_VERSION}.dist-info"
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: {DIST_NAME}\nVersion: {DIST_VERSION}\n",
        "entry_points.txt": f"[{PLUGIN_GROUP}]\n{PLUGIN_NAME} = {__name__}:register\n",
    }
    info.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = info / name
        if path.is_file() and path.read_text() == text:
            continue
        # Several servers may start at once: write aside, then rename over (readers never see half a file).
        fd, tmp = tempfile.mkstemp(dir=info, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return directory


def _prepend_path_env(*entries: str) -> None:
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    missing = [e for e in entries if e not in current]
    if missing:
        os.environ["PYTHONPATH"] = os.pathsep.join([*missing, *current])


def install_plugin(directory: Path | None = None) -> Path:
    """Make every vLLM process started from now on (and this one) serve DeepSeek-OCR's modes per request.

    Call before vLLM starts its processes; safe to call again. Returns the folder put on the paths.
    """
    folder = write_dist_info(directory or plugin_dir())
    os.environ[PLUGIN_DIR_ENV] = str(folder)  # children leave their marks where this process looks
    _prune_marks(folder / _MARKS)
    root = str(ROOT)
    for entry in (root, str(folder)):
        if entry not in sys.path:
            sys.path.append(entry)  # last: the folder holds only metadata, the root must shadow nothing
    _prepend_path_env(str(folder), root)
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        # An allow-list that leaves this plugin out would leave the engine core on vLLM's one-mode class.
        os.environ["VLLM_PLUGINS"] = ",".join(p for p in (allowed, PLUGIN_NAME) if p)
    importlib.invalidate_caches()
    register()
    return folder


def register() -> None:
    """vLLM plugin entry point: serve `DeepseekOCRForCausalLM` checkpoints with the per-request-mode class.

    Runs in every vLLM process (and may run more than once in one); registering again only overwrites.
    The class is named as a string, so vLLM imports it (and vLLM's model code) only when it needs it.
    """
    from vllm import ModelRegistry

    from engines.vllm import ocr2_encoder, sam_attention

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    ModelRegistry.register_model(OCR2_ARCHITECTURE, OCR2_MODEL_CLASS)
    ocr2_encoder.register()  # DeepSeek-OCR-2's encoder mask without a GPU sync per query
    sam_attention.register()  # SAM's relative positions without a (tokens x tokens) bias tensor
    if multiprocessing.parent_process() is not None:
        _mark_registered()


def _mark_registered() -> None:
    """Leave `<plugin dir>/registered/<parent pid>-<pid>`, so the process that spawned this one (vLLM's
    front end, for its engine core) can tell that the plugin loaded here (`children_registered`)."""
    marks = plugin_dir() / _MARKS
    try:
        marks.mkdir(parents=True, exist_ok=True)
        (marks / f"{os.getppid()}-{os.getpid()}").touch()
    except OSError:
        pass  # unwritable: the engine's start-up check then says the plugin was not seen


def children_registered(since: float) -> list[int]:
    """Pids of processes spawned by this one (multiprocessing) that registered the plugin at or after
    `since` (a `time.time()`); 2 s of slack for coarse file timestamps."""
    marks = plugin_dir() / _MARKS
    prefix = f"{os.getpid()}-"
    found = []
    for mark in marks.glob(prefix + "*") if marks.is_dir() else ():
        try:
            if mark.stat().st_mtime >= since - 2:
                found.append(int(mark.name[len(prefix):]))
        except (OSError, ValueError):
            continue
    return found


def _prune_marks(marks: Path) -> None:
    if not marks.is_dir():
        return
    old = time.time() - _MARK_MAX_AGE_S
    for mark in marks.iterdir():
        try:
            if mark.stat().st_mtime < old:
                mark.unlink()
        except OSError:
            continue
