"""What the training pipelines' command lines share: their common options and writing a model out."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def training_parser(
    doc: str | None, seed: int, max_iter: int, model_version: str, out: Path
) -> argparse.ArgumentParser:
    """A parser with the options every pipeline takes: --seed, --max-iter, --model-version, --out."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--max-iter", type=int, default=max_iter, help="boosting rounds")
    p.add_argument("--model-version", default=model_version)
    p.add_argument("--out", type=Path, default=out)
    return p


def write_model(
    out: Path, onnx: bytes, card: dict[str, Any], write_card_md: Callable[[dict[str, Any], Path], None]
) -> None:
    """The model at `out`, its card beside it as card.json and card.md."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(onnx)
    out.with_name("card.json").write_text(json.dumps(card, indent=2, default=float) + "\n")
    write_card_md(card, out.with_name("card.md"))
