"""The vision tasks the adapter generator packs (VaLoRA §accuracy-aware generation): data, metric, target.

Each task is a view of the synthetic data (vision/data.py) — the questions of one ``task`` — with its
own train / val / test split:

* **train**: up to ``train`` questions of the task from the data's train images;
* **val**: the data's val questions of the task plus those of ``adapters-val``, a held-out split of new
  images rendered for the generator (:func:`build_heldout`, ``HELDOUT`` questions per task) — the
  generator's decisions read val only;
* **test**: the data's test questions of the task plus those of ``adapters-test`` (rendered the same way
  from another seed): what ``evaluate`` reports.

So val and test have 174–234 questions per task, enough that a keep rule with a margin
(vision/adapter_gen.py) carries from val to test; no image is in two splits (the held-out images are new
renderings, each image of a task carries one question of that task).

The metric of every task is exact match after :func:`vision.data.normalize_answer` (the grounding task
answers with the 3×3 cell a shape is in, in words — "top left", "centre" —, so it is exact match too).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vision.data import Example, cache_features, load_split
from vision.data_render import MIX, render

# name → (the data's task field, what it asks, the default accuracy target on held-out questions), in the
# default packing order (tasks on the same images first). The targets follow TARGET_RULE and were fixed before
# any adapter was trained on these splits, from the base model's val accuracy (colour 0.492, grounding 0.505,
# counting 0.259, scene 0.994, reading 0.038 on 181/190/189/174/186 val questions); never from test.
TASKS: dict[str, tuple[str, str, float]] = {
    "colour": ("colour", "the colour of a named shape", 0.59),
    "grounding": ("grounding", "where a shape is: its 3x3 cell in words", 0.61),
    "counting": ("count", "how many shapes of a kind (1-6)", 0.36),
    "scene": ("scene", "beach, forest, city, night, snow or desert", 0.95),
    "reading": ("reading", "a written number (0-99) or short word", 0.14),
}
DEFAULT_TASKS = tuple(TASKS)
TARGET_RULE = ("the base model's accuracy on val plus 10 points, rounded to the hundredth (scene: 0.95, which "
               "the base model already meets)")
HELDOUT = 160  # questions per task in each of adapters-val and adapters-test
HELDOUT_SPLITS = {"val": "adapters-val", "test": "adapters-test"}


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


def build_heldout(folder: Path, split: str, per_task: int = HELDOUT, seed: int = 0, progress: bool = True,
                  encoder: Any = None) -> Path:
    """Render new images into ``folder`` as the split ``split`` (``adapters-val`` / ``adapters-test``) until each
    task has ``per_task`` questions; → its jsonl (``encoder``: the feature cache's, EfficientNet by default). Kinds are drawn with the data's mix among those whose tasks
    still need questions, so each task's questions follow the data's distribution; features are cached."""
    from tqdm import tqdm

    fields = {TASKS[n][0] for n in TASKS}
    rng = random.Random(f"adapter-heldout-{seed}-{split}")
    (folder / "images" / split).mkdir(parents=True, exist_ok=True)
    count = dict.fromkeys(fields, 0)
    made: dict[str, set[str]] = {}  # kind → the task fields it yields (learned as it renders)
    examples: list[Example] = []
    bar = tqdm(total=per_task * len(fields), desc=f"{split} images", disable=not progress, leave=False)
    i = 0
    while min(count.values()) < per_task:
        kinds = [k for k in MIX if not made.get(k) or any(count[f] < per_task for f in made[k])]
        kind = rng.choices(kinds, weights=[MIX[k] for k in kinds])[0]
        image, qas = render(kind, rng)
        made[kind] = {qa.task for qa in qas if qa.task in fields}
        keep = [qa for qa in qas if qa.task in fields and count[qa.task] < per_task]
        if not keep:
            continue
        rel = f"images/{split}/{i:05d}.png"
        image.save(folder / rel, optimize=False)
        for j, qa in enumerate(keep):
            examples.append(Example(f"{split}-i{i:05d}-{j}", split, qa.task, "image", qa.question, qa.answer, rel,
                                    qa.meta))
            count[qa.task] += 1
            bar.update(1)
        i += 1
    bar.close()
    path = folder / f"{split}.jsonl"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for ex in examples:
            f.write(json.dumps(asdict(ex)) + "\n")
    tmp.rename(path)
    cache_features(folder, split, progress=progress, encoder=encoder)
    return path


def load_tasks(folder: Path, names: list[str], targets: dict[str, float] | None = None, train: int = 400,
               val: int | None = None, test: int | None = None, heldout: int = HELDOUT) -> list[TaskData]:
    """The tasks ``names`` from the data folder, with ``targets`` overriding the defaults; the held-out splits
    are rendered on first use (``heldout`` questions per task; 0: the data's own val and test only)."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: choose from {', '.join(TASKS)}")
    folder = Path(folder)
    splits = {s: load_split(folder, s) for s in ("train", "val", "test")}
    for i, (base, extra) in enumerate(HELDOUT_SPLITS.items()):
        if heldout > 0:
            if not (folder / f"{extra}.jsonl").is_file():
                build_heldout(folder, extra, heldout, seed=i)
            splits[base] = splits[base] + load_split(folder, extra)
    out = []
    for name in names:
        field, _, default = TASKS[name]
        of = {s: [e for e in exs if e.task == field] for s, exs in splits.items()}
        tr, va, te = of["train"][:train], of["val"][:val], of["test"][:test]
        if not tr or not va or not te:
            raise ValueError(f"task {name}: no {field!r} questions in one of the splits of {folder}")
        out.append(TaskData(name, field, (targets or {}).get(name, default), tr, va, te))
    return out
