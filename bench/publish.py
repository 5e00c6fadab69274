"""The one way a benchmark reports: print its markdown, save its raw results, append the markdown to RESULTS.md."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def publish(text: str, results: dict, json_path: Path | None, dry: bool) -> None:
    """``text`` to stdout, ``results`` to ``json_path`` (if given), ``text`` appended to RESULTS.md unless ``dry``."""
    print(text)
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))
    if not dry:
        with open(RESULTS, "a") as f:
            f.write(text)
