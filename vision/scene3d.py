"""Synthetic 3D question answering: scenes of coloured primitives (open3d meshes sampled to points) + questions.

``python -m vision.scene3d build [--quick] [--seed S] [--out DIR]`` writes, per split (train / val / test):

* ``{split}.npz``: ``points`` (n_scenes, n_points, 6) float16 xyz + rgb (metres, not normalised; z is up,
  x runs left → right as the viewer sees it) and ``labels`` (n_scenes, n_points) int8, the object each
  point was sampled from;
* ``{split}.jsonl``: one line per scene: its objects (shape, colour, size, centre, what it stands on) and
  its questions with one- or two-word answers.

Scenes: 2–4 objects on the ground in a 2 m × 2 m area, each a box, sphere, cylinder or plane (a thin
square slab), small or large, of a colour unique in its scene; sometimes one small object stands on
another. Question kinds (:data:`KINDS`): counting, counting a shape, colour of a shape, shape of a colour,
size, left-of, existence, and "what is on the X" (a two-word answer). Yes/no answers are balanced. Each
scene comes from its own generator seeded by (seed, split, index): the same arguments give the same bytes.
Points are drawn on the mesh triangles with our own area-weighted sampler (open3d's sampler has its own
global random state).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

COLOURS = {
    "red": (0.86, 0.12, 0.12), "green": (0.15, 0.7, 0.2), "blue": (0.15, 0.3, 0.9),
    "yellow": (0.95, 0.85, 0.1), "purple": (0.55, 0.2, 0.7), "orange": (0.98, 0.55, 0.1),
}
SHAPES = ("box", "sphere", "cylinder", "plane")
PLURAL = {"box": "boxes", "sphere": "spheres", "cylinder": "cylinders", "plane": "planes"}
NUMBERS = ("zero", "one", "two", "three", "four", "five")
SIZES = {"small": 0.28, "large": 0.55}
KINDS = ("count", "count_shape", "colour", "shape", "size", "left", "exists", "on")
SPLITS = {"train": 0, "val": 1, "test": 2}
DEFAULT_OUT = Path("data/scene3d")
QUICK_OUT = Path("data/scene3d-quick")


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    centre: tuple[float, float, float]  # of the bounding box
    extent: tuple[float, float, float]  # full width (x), depth (y), height (z)
    on: int = -1  # index of the object it stands on, -1 = the ground

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    objects: list[Obj]
    questions: list[dict[str, str]] = field(default_factory=list)


@dataclass
class SceneConfig:
    n_points: int = 1024
    min_objects: int = 2
    max_objects: int = 4
    questions_per_scene: int = 3
    stack_prob: float = 0.35
    noise: float = 0.004  # metres of Gaussian jitter on every point

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= len(COLOURS):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(COLOURS)}")
        if self.n_points < 64:
            raise ValueError("n_points must be at least 64")


# ---------------------------------------------------------------------------------------------- scenes
def _extent(shape: str, s: float, rng: np.random.Generator) -> tuple[float, float, float]:
    if shape == "box":
        w, d, h = s * rng.uniform(0.8, 1.2, 3)
        return (w, d, h)
    if shape == "sphere":
        return (s, s, s)
    if shape == "cylinder":
        return (s * 0.8, s * 0.8, s * 1.2)
    return (s * 1.6, s * 1.6, 0.02)  # plane: a thin square slab


def make_scene(rng: np.random.Generator, cfg: SceneConfig) -> Scene:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    colours = rng.choice(list(COLOURS), n, replace=False)
    objs: list[Obj] = []
    stacked = n >= 2 and rng.random() < cfg.stack_prob
    n_ground = n - 1 if stacked else n
    for i in range(n_ground):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = "small" if rng.random() < 0.5 else "large"
        ext = _extent(shape, SIZES[size] * rng.uniform(0.9, 1.1), rng)
        r = max(ext[0], ext[1]) / 2
        for _ in range(200):  # rejection sampling of a free spot on the ground
            x, y = rng.uniform(-1 + r, 1 - r, 2)
            if all(np.hypot(x - o.centre[0], y - o.centre[1]) > r + max(o.extent[:2]) / 2 + 0.08 for o in objs):
                break
        objs.append(Obj(shape, str(colours[i]), size, (float(x), float(y), ext[2] / 2), tuple(map(float, ext))))
    if stacked:  # a small object on a flat-topped one
        supports = [i for i, o in enumerate(objs) if o.shape in ("box", "cylinder", "plane")]
        if supports:
            base = objs[supports[int(rng.integers(len(supports)))]]
            shape = ("box", "sphere", "cylinder")[int(rng.integers(3))]
            ext = _extent(shape, SIZES["small"] * rng.uniform(0.8, 0.95), rng)
            z = base.centre[2] + base.extent[2] / 2 + ext[2] / 2
            objs.append(Obj(shape, str(colours[n - 1]), "small", (base.centre[0], base.centre[1], z),
                            tuple(map(float, ext)), on=objs.index(base)))
    return Scene(objs)


def _mesh(obj: Obj):
    import open3d as o3d

    w, d, h = obj.extent
    if obj.shape in ("box", "plane"):
        m = o3d.geometry.TriangleMesh.create_box(w, d, h)
        m.translate((-w / 2, -d / 2, -h / 2))
    elif obj.shape == "sphere":
        m = o3d.geometry.TriangleMesh.create_sphere(radius=w / 2, resolution=16)
    else:
        m = o3d.geometry.TriangleMesh.create_cylinder(radius=w / 2, height=h, resolution=24, split=1)
    m.translate(obj.centre)
    return m


def _sample_mesh(mesh, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniformly on the mesh surface (area-weighted triangles, uniform barycentric)."""
    v = np.asarray(mesh.vertices)
    t = np.asarray(mesh.triangles)
    a, b, c = v[t[:, 0]], v[t[:, 1]], v[t[:, 2]]
    area = np.linalg.norm(np.cross(b - a, c - a), axis=1) / 2
    tri = rng.choice(len(t), n, p=area / area.sum())
    u, w = rng.random(n), rng.random(n)
    flip = u + w > 1
    u[flip], w[flip] = 1 - u[flip], 1 - w[flip]
    return a[tri] + u[:, None] * (b[tri] - a[tri]) + w[:, None] * (c[tri] - a[tri])


def sample_points(scene: Scene, cfg: SceneConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n_points, 6) xyz + rgb and (n_points,) object index; points shared equally among objects."""
    n_obj = len(scene.objects)
    counts = [cfg.n_points // n_obj + (i < cfg.n_points % n_obj) for i in range(n_obj)]
    pts, labels = [], []
    for i, (o, k) in enumerate(zip(scene.objects, counts, strict=True)):
        xyz = _sample_mesh(_mesh(o), k, rng) + rng.normal(0, cfg.noise, (k, 3))
        rgb = np.clip(np.asarray(COLOURS[o.colour]) + rng.normal(0, 0.03, (k, 3)), 0, 1)
        pts.append(np.concatenate([xyz, rgb], 1))
        labels.append(np.full(k, i, np.int8))
    return np.concatenate(pts).astype(np.float32), np.concatenate(labels)


# ---------------------------------------------------------------------------------------------- questions
def _candidates(scene: Scene, rng: np.random.Generator) -> dict[str, list[tuple[str, str]]]:
    objs = scene.objects
    shapes = Counter(o.shape for o in objs)
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in KINDS}
    out["count"].append(("How many objects are there?", NUMBERS[len(objs)]))
    s = SHAPES[int(rng.integers(len(SHAPES)))]
    out["count_shape"].append((f"How many {PLURAL[s]} are there?", NUMBERS[shapes[s]]))
    for o in objs:
        if shapes[o.shape] == 1:
            out["colour"].append((f"What colour is the {o.shape}?", o.colour))
        out["shape"].append((f"What shape is the {o.colour} object?", o.shape))
        out["size"].append((f"Is the {o.name} small or large?", o.size))
    pairs = [(a, b) for a in objs for b in objs if a is not b and abs(a.centre[0] - b.centre[0]) > 0.25]
    if pairs:
        want_yes = rng.random() < 0.5
        good = [(a, b) for a, b in pairs if (a.centre[0] < b.centre[0]) == want_yes]
        a, b = good[int(rng.integers(len(good)))]
        out["left"].append((f"Is the {a.name} left of the {b.name}?", "yes" if want_yes else "no"))
    if rng.random() < 0.5:
        o = objs[int(rng.integers(len(objs)))]
        out["exists"].append((f"Is there a {o.name}?", "yes"))
    else:
        present = {(o.colour, o.shape) for o in objs}
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        c, s = absent[int(rng.integers(len(absent)))]
        out["exists"].append((f"Is there a {c} {s}?", "no"))
    for o in objs:
        if o.on >= 0:
            out["on"].append((f"What is on the {objs[o.on].name}?", o.name))
    return out


def make_questions(scene: Scene, rng: np.random.Generator, k: int) -> list[dict[str, str]]:
    """``k`` questions of different kinds (the rarer "on" first when the scene has one)."""
    cands = {kind: c for kind, c in _candidates(scene, rng).items() if c}
    kinds = list(cands)
    order = (["on"] if "on" in cands else []) + [kinds[i] for i in rng.permutation(len(kinds)) if kinds[i] != "on"]
    out = []
    for kind in order[:k]:
        q, a = cands[kind][int(rng.integers(len(cands[kind])))]
        out.append({"kind": kind, "question": q, "answer": a})
    return out


def generate(seed: int, split: str, index: int, cfg: SceneConfig) -> tuple[Scene, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, SPLITS[split], index])
    scene = make_scene(rng, cfg)
    points, labels = sample_points(scene, cfg, rng)
    scene.questions = make_questions(scene, rng, cfg.questions_per_scene)
    return scene, points, labels


# ---------------------------------------------------------------------------------------------- dataset
def build(out: Path, sizes: dict[str, int], seed: int = 0, cfg: SceneConfig | None = None) -> dict:
    cfg = cfg or SceneConfig()
    out.mkdir(parents=True, exist_ok=True)
    meta = {"seed": seed, "sizes": sizes, "config": asdict(cfg)}
    for split, n in sizes.items():
        pts = np.zeros((n, cfg.n_points, 6), np.float16)
        labels = np.zeros((n, cfg.n_points), np.int8)
        with open(out / f"{split}.jsonl", "w") as f:
            for i in tqdm(range(n), desc=f"scene3d {split}", unit="scene"):
                scene, p, lab = generate(seed, split, i, cfg)
                pts[i], labels[i] = p, lab
                f.write(json.dumps({"scene": i, "objects": [asdict(o) for o in scene.objects],
                                    "questions": scene.questions}) + "\n")
        np.savez(out / f"{split}.npz", points=pts, labels=labels)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


@dataclass
class Example:
    scene: int
    kind: str
    question: str
    answer: str


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[dict], list[Example]]:
    """``(points float32 (n, P, 6), labels (n, P), scenes, examples)`` of a built split."""
    path = Path(folder) / f"{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run python -m vision.scene3d build"
                                f"{' --quick' if 'quick' in str(folder) else ''}")
    z = np.load(path)
    scenes = [json.loads(line) for line in open(Path(folder) / f"{split}.jsonl")]
    examples = [Example(s["scene"], q["kind"], q["question"], q["answer"]) for s in scenes for q in s["questions"]]
    return z["points"].astype(np.float32), z["labels"], scenes, examples


def majority_baseline(train: list[Example], test: list[Example]) -> float:
    """Accuracy of answering each kind's most frequent training answer: the "chance" line."""
    best = {k: Counter(e.answer for e in train if e.kind == k).most_common(1)[0][0]
            for k in {e.kind for e in train}}
    return float(np.mean([best.get(e.kind) == e.answer for e in test]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vision.scene3d", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="generate the scenes and questions")
    b.add_argument("--quick", action="store_true", help="a tiny set (seconds) for tests and smoke runs")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", type=Path, default=None)
    b.add_argument("--train", type=int, default=6000, help="scenes in the training split")
    b.add_argument("--points", type=int, default=1024, help="points per scene")
    args = ap.parse_args(argv)
    sizes = {"train": 200, "val": 40, "test": 60} if args.quick else {"train": args.train, "val": 300, "test": 500}
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    build(out, sizes, args.seed, SceneConfig(n_points=args.points))
    _, _, _, train = load_split(out, "train")
    _, _, _, test = load_split(out, "test")
    kinds = Counter(e.kind for e in train)
    print(f"wrote {out}: {sizes}; {len(train)} training questions {dict(kinds)}; "
          f"majority-answer baseline on test {majority_baseline(train, test):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
