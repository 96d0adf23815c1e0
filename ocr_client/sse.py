"""A Server-Sent Events reader over a line iterator: the subset of the format the jobs API writes.

The jobs stream sends `id:`, `event:` and one `data:` line per message, and `: ping` comment lines while
nothing happens. Parsing it here (a dozen lines) keeps the client free of an SSE dependency.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Event:
    event: str = "message"
    id: str | None = None
    data_lines: list[str] = field(default_factory=list)

    @property
    def data(self) -> Any:
        """The JSON payload (the jobs API writes one line of JSON); the raw text when it is not JSON."""
        text = "\n".join(self.data_lines)
        try:
            return json.loads(text) if text else {}
        except ValueError:
            return text


def parse(lines: Iterable[str]) -> Iterator[Event]:
    """Events as they complete (a blank line ends one); comments and unknown fields are skipped."""
    current = Event()
    seen = False
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if seen:
                yield current
            current, seen = Event(), False
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            current.event, seen = value, True
        elif name == "data":
            current.data_lines.append(value)
            seen = True
        elif name == "id":
            current.id, seen = value, True
    if seen:
        yield current
