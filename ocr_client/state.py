"""The per-input state file that makes a second run follow the job the first one submitted.

`{out}/.{stem}.job.json` is written right after `POST /jobs` answers 202, before any waiting, so Ctrl-C, a
SIGKILL or a lost connection at any later moment leaves it behind. It names the server and the input (size and
mtime) and the options: a run against another server, on a changed file or with other options submits anew
instead of returning a job that does not match. It is removed once the job's outputs are written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def path_for(out_dir: Path, stem: str) -> Path:
    return out_dir / f".{stem}.job.json"


def fingerprint(source: Path, url: str, options: dict[str, Any]) -> dict[str, Any]:
    st = source.stat()
    return {"url": url.rstrip("/"), "input": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "options": {k: v for k, v in options.items() if v is not None}}


def load(path: Path, expected: dict[str, Any]) -> str | None:
    """The job id of a matching state file, else None (missing, unreadable, or for other input/server/options)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("job_id"), str):
        return None
    if any(saved.get(k) != v for k, v in expected.items()):
        return None
    return saved["job_id"]


def save(path: Path, job_id: str, expected: dict[str, Any]) -> None:
    """Written atomically (temp file + rename): a kill mid-write never leaves half a file to misread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"job_id": job_id, **expected}, indent=2))
    os.replace(tmp, path)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
