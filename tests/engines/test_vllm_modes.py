"""The vLLM per-request-mode plugin's pure parts, on CPU without vLLM (`engines.vllm.modes`).

The placeholder count vLLM will use (`count_placeholders`) against DEEPSEEK_OCR_FACTS section 3 and our own
`process.image_process` count for all five modes; the per-request kwargs; the plugin's distribution
metadata as `importlib.metadata` sees it in a fresh interpreter, in a `subprocess` child (PYTHONPATH) and in
a `multiprocessing` spawn child (sys.path), which is how vLLM starts its engine core. A stand-in `vllm`
package (only `ModelRegistry.register_model`, recording its calls) takes the place of the absent library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engines.vllm import modes as vllm_modes
from engines.vllm.modes import GUNDAM, ViewSizes, count_placeholders, mode_kwargs, write_dist_info
from process.modes import MODES, choose_grid, count_image_tokens

ROOT = Path(__file__).resolve().parents[2]
SIZES = [(1, 1), (64, 64), (600, 500), (640, 640), (641, 640), (640, 641), (1024, 1024), (1190, 1684),
         (1684, 1190), (1200, 800), (8000, 300), (300, 2000), (100, 3000), (2000, 2000), (5000, 5000)]
# FACTS section 3: modes without tiles have one count whatever the image.
FACTS_FIXED = {"tiny": 73, "small": 111, "base": 273, "large": 421}
# FACTS section 3, Gundam: 273 within 640x640, A4 at 144 dpi 903, 933 at most (1x6).
FACTS_GUNDAM = {(600, 500): 273, (640, 640): 273, (64, 64): 273, (1190, 1684): 903, (300, 2000): 933}


def grid(width: int, height: int, image_size: int) -> tuple[int, int]:
    return choose_grid(width, height, image_size)


@pytest.mark.parametrize("mode", list(MODES))
def test_placeholder_count_matches_facts_and_ours(mode: str) -> None:
    spec = MODES[mode]
    sizes = ViewSizes.for_mode(spec)
    for width, height in SIZES:
        got = count_placeholders(width, height, sizes, grid)
        ours = count_image_tokens(width, height, spec.base_size, spec.image_size, spec.crop)
        assert got == ours, (mode, width, height, got, ours)
        if mode in FACTS_FIXED:
            assert got == FACTS_FIXED[mode], (mode, width, height, got)
        elif (width, height) in FACTS_GUNDAM:
            assert got == FACTS_GUNDAM[(width, height)], (mode, width, height, got)


def test_gundam_count_range_and_a_1x1_grid_adds_nothing() -> None:
    counts = {count_placeholders(w, h, GUNDAM, grid) for w in range(200, 4000, 97) for h in range(200, 4000, 89)}
    assert min(counts) == 273 and max(counts) == 933, sorted(counts)
    # A grid function answering 1x1 (vLLM's with min crops 1) must not add a tile row.
    assert count_placeholders(2000, 2000, GUNDAM, lambda w, h, s: (1, 1)) == 273


def test_mode_kwargs_round_trip_and_gundam_defaults() -> None:
    for spec in MODES.values():
        kwargs = mode_kwargs(spec)
        assert kwargs == {"image_size": spec.image_size, "base_size": spec.base_size, "crop_mode": spec.crop}
        assert ViewSizes.from_kwargs(kwargs) == ViewSizes(spec.base_size, spec.image_size, spec.crop)
    assert ViewSizes.from_kwargs({}) == GUNDAM == ViewSizes.for_mode(MODES["gundam"])
    assert ViewSizes.from_kwargs({"crop_mode": False, "other": 1}) == ViewSizes(1024, 640, False)
    assert GUNDAM.as_list() == [1024, 640, 1]


@pytest.mark.parametrize("kwargs", [{"base_size": 1000}, {"image_size": 0}, {"image_size": True},
                                    {"base_size": "1024"}, {"image_size": 640.0}, {"crop_mode": "yes"},
                                    {"crop_mode": 1}])
def test_bad_kwargs_are_value_errors_naming_the_value(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=repr(next(iter(kwargs.values()))).replace(".", r"\.")):
        ViewSizes.from_kwargs(kwargs)


def test_prompt_builder_sends_the_modes_kwargs_for_ocr_only(tiny_checkpoint: Path,
                                                            tiny_checkpoint_v2: Path) -> None:
    from PIL import Image

    from engines.vllm.engine import PromptBuilder, mm_processor_kwargs
    from process.modes import MODES_V2

    image = Image.new("RGB", (300, 200), "white")
    v1 = PromptBuilder.from_checkpoint(tiny_checkpoint)
    assert v1.arch == "ocr"
    for spec in MODES.values():
        prompt = v1.prompt("<image>\nFree OCR.", image, spec)
        assert prompt["mm_processor_kwargs"] == mm_processor_kwargs(spec) == mode_kwargs(spec), prompt
        assert prompt["prompt_token_ids"].count(v1.image_id) == 1, prompt
    assert "mm_processor_kwargs" not in v1.prompt("Hello", None, MODES["base"])
    v2 = PromptBuilder.from_checkpoint(tiny_checkpoint_v2)
    assert v2.arch == "ocr2"
    assert "mm_processor_kwargs" not in v2.prompt("<image>\nFree OCR.", image, MODES_V2["gundam"])


def test_dist_info_is_written_once_and_found_by_importlib_metadata(tmp_path: Path) -> None:
    write_dist_info(tmp_path)
    info = tmp_path / f"{vllm_modes.DIST_NAME}-{vllm_modes.DIST_VERSION}.dist-info"
    before = {p.name: p.stat().st_mtime_ns for p in info.iterdir()}
    write_dist_info(tmp_path)  # idempotent: same files, untouched, no temp files left
    assert {p.name: p.stat().st_mtime_ns for p in info.iterdir()} == before
    assert set(before) == {"METADATA", "entry_points.txt"}
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.append({str(tmp_path)!r})
        from importlib.metadata import entry_points
        eps = entry_points(group="vllm.general_plugins")
        print(json.dumps([[ep.name, ep.value, ep.dist.name] for ep in eps]))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # Loading it (importing engines.vllm.modes) is the next test's part.
    found = json.loads(out.stdout)
    assert [vllm_modes.PLUGIN_NAME, "engines.vllm.modes:register", vllm_modes.DIST_NAME] in found, found


STAND_IN_VLLM = '''
"""Stand-in for the vllm package on CPU: records ModelRegistry.register_model calls."""
import os


class _Registry:
    def register_model(self, arch, cls):
        with open(os.environ["STAND_IN_LOG"], "a") as f:
            f.write(f"{os.getpid()} {arch} {cls}\\n")


ModelRegistry = _Registry()
'''

SPAWN_SCRIPT = '''
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path


def child() -> None:
    # What vllm.plugins.load_general_plugins does in the engine core it spawns (VLLM_PLUGINS: an allow-list).
    import os
    from importlib.metadata import entry_points

    if "deepseek_ocr_modes" not in os.environ["VLLM_PLUGINS"].split(","):
        raise SystemExit("VLLM_PLUGINS leaves the plugin out: " + os.environ["VLLM_PLUGINS"])

    for ep in entry_points(group="vllm.general_plugins"):
        if ep.name == "deepseek_ocr_modes":
            ep.load()()


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])  # the stand-in vllm, as if installed
    from engines.vllm import modes as vllm_modes

    import time

    started = time.time()
    vllm_modes.install_plugin(Path(sys.argv[2]))
    assert vllm_modes.children_registered(started) == [], "marked before any child ran"
    proc = mp.get_context("spawn").Process(target=child)
    proc.start()
    proc.join(60)
    # A subprocess child (vLLM's model-registry probe) sees only the environment: PYTHONPATH.
    probe = "import sys; sys.path.insert(0, %r); import runpy; runpy.run_path(%r, run_name='probe')"
    subprocess.run([sys.executable, "-c", probe % (sys.argv[1], __file__)], check=True, cwd="/")
    # Only the spawned child (as vLLM's engine core) marks itself, and only for its parent.
    assert vllm_modes.children_registered(started) == [proc.pid], vllm_modes.children_registered(started)
    assert vllm_modes.children_registered(time.time() + 60) == []
    sys.exit(proc.exitcode)

if __name__ == "probe":
    child()
'''


def test_install_plugin_reaches_spawned_and_subprocess_children(tmp_path: Path) -> None:
    stand_in = tmp_path / "site"
    (stand_in / "vllm").mkdir(parents=True)
    (stand_in / "vllm" / "__init__.py").write_text(STAND_IN_VLLM)
    script = tmp_path / "spawn_check.py"
    script.write_text(SPAWN_SCRIPT)
    log = tmp_path / "registered.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(STAND_IN_LOG=str(log), PYTHONPATH=str(ROOT), VLLM_PLUGINS="someone_else")
    out = subprocess.run([sys.executable, str(script), str(stand_in), str(tmp_path / "plugin")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = log.read_text().splitlines()
    # The parent (install_plugin registers directly), the spawned child and the subprocess child, each both
    # architectures.
    assert len(lines) == 6 and len({line.split()[0] for line in lines}) == 3, lines
    by_process: dict[str, list[list[str]]] = {}
    for line in lines:
        pid, *pair = line.split()
        by_process.setdefault(pid, []).append(pair)
    expected = [[vllm_modes.ARCHITECTURE, vllm_modes.MODEL_CLASS],
                [vllm_modes.OCR2_ARCHITECTURE, vllm_modes.OCR2_MODEL_CLASS]]
    assert all(pairs == expected for pairs in by_process.values()), lines
