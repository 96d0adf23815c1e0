"""Where the CPU side's time goes: a py-spy raw profile summarised per process and per kind of work.

    py-spy record --pid PID --gil --nonblocking --format raw --output prof.PID.txt   (one per process)
    python benchmarks/profile_summary.py prof.*.txt --seconds 60

`--gil` keeps only samples of threads that hold the GIL, so each process's total is the share of its one
GIL that was busy; a process near 100% (samples / duration / rate) is GIL-bound. Each sample is put in the
kind of its deepest frame that matches a rule below (leaf first), so "vLLM output processing" holds the
detokeniser and everything it calls, and "other" is what no rule names.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

RULES = (  # (kind, regex on one frame "function (file:line)"), leaf-first matching
    ("image preprocessing (vLLM processor, PIL, torchvision)",
     r"transformers_utils/processors/|multimodal/processing|PIL/|torchvision/|vllm_image|ImageOps"),
    ("vLLM output processing / detokenise", r"v1/engine/output_processor|detokenizer|tokenizers"),
    ("vLLM input processing / renderer", r"v1/engine/input_processor|renderer|inputs/preprocess|multimodal/"),
    ("vLLM engine core (scheduler, model runner)", r"v1/core/|v1/worker/|model_executor/|v1/engine/core\.py"),
    ("vLLM client / IPC (zmq, msgpack)", r"core_client|zmq|msgspec|serial_utils"),
    ("worker transport (pickle frames)", r"workers/wire|workers/client|workers/host|pickle"),
    ("PDF render pool", r"pdf_render|pdf_worker|pymupdf|fitz"),
    ("post-processing (parse, markdown, answers)", r"ocr_utils|answers\.py|pipeline\.py:.*postprocess|searchable"),
    ("image decode and views (images.py, process/)", r"/images\.py|image_pixels|process/image_process"),
    ("service (service/, web/, jobs/, engines/)", r"/service/|/web/|/jobs/|engines/|pipeline\.py|admission\.py"),
    ("HTTP (uvicorn, starlette, multipart, json)", r"uvicorn|starlette|fastapi|h11|httptools|multipart|json/"),
    ("asyncio event loop", r"asyncio/"),
    ("torch", r"torch/"),
)
COMPILED = [(kind, re.compile(rx)) for kind, rx in RULES]


def kind_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for kind, rx in COMPILED:
            if rx.search(frame):
                return kind
    return "other"


def _process_name(path: str) -> str:
    """`prof.PID.txt` -> "PID: its command line" while it runs, else the file name."""
    pid = path.rsplit(".", 2)[-2] if path.count(".") >= 2 else ""
    names = Path(path.rsplit(".", 2)[0] + ".pids.json")  # written by bench_vllm.py beside the profiles
    if names.is_file():
        return f"pid {pid}: {json.loads(names.read_text()).get(pid, '?')}"
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        cmd = ""
    return f"{path} {cmd}".strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("profiles", nargs="+", help="py-spy raw files, one per process")
    parser.add_argument("--rate", type=float, default=40.0, help="py-spy's --rate")
    parser.add_argument("--seconds", type=float, help="the recording's length: prints each GIL's busy share")
    parser.add_argument("--top", type=int, default=0, help="also the N most sampled frames of each process "
                        "(a frame counts once per sample it is on: inclusive time)")
    args = parser.parse_args()
    per_process: dict[str, Counter[str]] = defaultdict(Counter)
    frames_of: dict[str, Counter[str]] = defaultdict(Counter)
    for path in args.profiles:
        name = _process_name(path)
        for line in open(path, encoding="utf-8", errors="replace"):
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            per_process[name][kind_of(frames)] += int(count)
            for frame in set(frames):
                frames_of[name][frame] += int(count)
    for process, kinds in sorted(per_process.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(kinds.values())
        busy = f", GIL busy {100 * total / args.rate / args.seconds:.0f}%" if args.seconds else ""
        print(f"\n{process[:110]}  ({total} samples = {total / args.rate:.1f} s{busy})")
        for kind, n in kinds.most_common():
            print(f"  {100 * n / total:5.1f}%  {kind}")
        for frame, n in frames_of[process].most_common(args.top):
            print(f"      {100 * n / total:5.1f}%  {frame[:150]}")


if __name__ == "__main__":
    main()
