"""The vision tasks the adapter generator packs (VaLoRA §accuracy-aware generation): data, metric, target.

Each task is a view of the synthetic data (vision/data.py) — the questions of one ``task`` — with its
own train / val / test split:

* **train**: up to ``train`` questions of the task from the data's train images, except held-out ones;
* **val**: the data's val questions of the task, topped up from held-out train images (a tenth of
  them, chosen by a hash of the image path, so that no val image is ever trained on) — the generator's
  packing decisions read val only;
* **test**: the data's test questions of the task (held-out images): what ``evaluate`` reports.

The metric of every task is exact match after :func:`vision.data.normalize_answer` (the grounding task
answers with the 3×3 cell a shape is in, in words — "top left", "centre" —, so it is exact match too).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from vision.data import Example, load_split

# name → (the data's task field, what it asks, the default accuracy target on held-out questions), in the
# default packing order (tasks on the same images first). The targets were set from what each task's own
# adapter (rank 8 on q/v over the frozen projector, 90 steps on this CPU) reached on *val*, about one val
# question below it, never from test; what they reach on test is in docs/adapters.md.
TASKS: dict[str, tuple[str, str, float]] = {
    "colour": ("colour", "the colour of a named shape", 0.48),
    "grounding": ("grounding", "where a shape is: its 3x3 cell in words", 0.58),
    "counting": ("count", "how many shapes of a kind (1-6)", 0.44),
    "scene": ("scene", "beach, forest, city, night, snow or desert", 0.95),
    "reading": ("reading", "a written number (0-99) or short word", 0.09),
}
DEFAULT_TASKS = tuple(TASKS)


@dataclass
class TaskData:
    name: str
    task: str  # the data's ``task`` field
    target: float
    train: list[Example]
    val: list[Example]
    test: list[Example]

    def split(self, name: str) -> list[Example]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def held_out(image: str | None) -> bool:
    """A tenth of the train images, by a stable hash of the path: the generator's extra val questions."""
    return image is not None and int(hashlib.sha1(image.encode()).hexdigest()[:8], 16) % 10 == 0


def load_tasks(folder: Path, names: list[str], targets: dict[str, float] | None = None, train: int = 400,
               val: int = 64, test: int | None = None) -> list[TaskData]:
    """The tasks ``names`` from the data folder, with ``targets`` overriding the defaults."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: choose from {', '.join(TASKS)}")
    splits = {s: load_split(folder, s) for s in ("train", "val", "test")}
    out = []
    for name in names:
        field, _, default = TASKS[name]
        of = {s: [e for e in exs if e.task == field] for s, exs in splits.items()}
        tr = [e for e in of["train"] if not held_out(e.image)][:train]
        va = (of["val"] + [e for e in of["train"] if held_out(e.image)])[:val]
        te = of["test"][:test] if test is not None else of["test"]
        if not tr or not va or not te:
            raise ValueError(f"task {name}: no {field!r} questions in one of the splits of {folder}")
        out.append(TaskData(name, field, (targets or {}).get(name, default), tr, va, te))
    return out
