"""The corpus layout on disk and the manifests that index it; the trainer's way in.

Layout under the corpus root:

    speech/{train,val,test}.jsonl   + speech/{split}/*.wav   target-voice (Piper) sentences
    listen/{train,val,test}.jsonl   + listen/{split}/*.wav   interruption / back-channel clips
    noise/{train,val,test}.jsonl    + noise/{split}/*.wav    background noise
    meta.json                                                seed, counts, durations, speakers, tools

One JSON object per line; `path` is relative to the root in the file (so a corpus can be moved) and
absolute in what `load_manifest` returns (so the trainer can open it directly). All wavs are 16 kHz mono
16-bit PCM.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

PARTS: tuple[str, ...] = ("speech", "listen", "noise")
SPLITS: tuple[str, ...] = ("train", "val", "test")


def manifest_path(root: str | Path, part: str, split: str) -> Path:
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(root) / part / f"{split}.jsonl"


def write_manifest(root: str | Path, part: str, split: str, rows: Iterable[dict]) -> Path:
    path = manifest_path(root, part, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")
    return path


def read_manifest_raw(root: str | Path, part: str, split: str) -> list[dict]:
    """Rows exactly as stored (paths relative to the root)."""
    path = manifest_path(root, part, split)
    if not path.is_file():
        raise FileNotFoundError(f"no manifest {path}; build the corpus with: python -m speech.data build "
                                f"--out {root}")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_manifest(root: str | Path, part: str, split: str) -> list[dict]:
    """Rows of `part` ("speech", "listen", "noise") in `split` ("train", "val", "test"), with `path`
    made absolute."""
    root = Path(root).resolve()
    rows = read_manifest_raw(root, part, split)
    for row in rows:
        row["path"] = str(root / row["path"])
    return rows


def load_meta(root: str | Path) -> dict:
    path = Path(root) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: the corpus is missing or its build did not finish")
    return json.loads(path.read_text(encoding="utf-8"))
