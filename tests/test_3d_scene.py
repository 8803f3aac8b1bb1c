"""The synthetic 3D QA set: deterministic, answers true of the generated scene, points on the right objects."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("open3d")

from vision.scene3d import COLOURS, NUMBERS, PLURAL, SceneConfig, build, generate, load_split  # noqa: E402

CFG = SceneConfig(n_points=256)


def test_deterministic_and_splits_differ():
    a = generate(3, "train", 7, CFG)
    b = generate(3, "train", 7, CFG)
    assert np.array_equal(a[1], b[1]) and a[0].questions == b[0].questions
    c = generate(3, "test", 7, CFG)
    assert not np.array_equal(a[1], c[1])


def test_build_is_reproducible(tmp_path):
    for d in ("a", "b"):
        build(tmp_path / d, {"train": 6, "test": 3}, seed=1, cfg=CFG)
    for f in ("train.npz", "train.jsonl", "test.npz"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    pts, labels, scenes, ex = load_split(tmp_path / "a", "train")
    assert pts.shape == (6, 256, 6) and labels.shape == (6, 256) and len(ex) == 6 * CFG.questions_per_scene


def _check(scene, points, labels, q):
    objs = scene.objects
    kind, text, ans = q["kind"], q["question"], q["answer"]
    by_name = {o.name: o for o in objs}
    if kind == "count":
        assert ans == NUMBERS[len(objs)]
    elif kind == "count_shape":
        shape = next(s for s, p in PLURAL.items() if f" {p} " in text)
        assert ans == NUMBERS[sum(o.shape == shape for o in objs)]
    elif kind == "colour":
        shape = text.split("the ")[1].rstrip("?")
        (o,) = [o for o in objs if o.shape == shape]
        assert ans == o.colour
    elif kind == "shape":
        colour = text.split("the ")[1].split(" ")[0]
        assert ans == next(o.shape for o in objs if o.colour == colour)
    elif kind == "size":
        name = text.removeprefix("Is the ").removesuffix(" small or large?")
        assert ans == by_name[name].size
    elif kind == "left":
        a, b = text.removeprefix("Is the ").removesuffix("?").split(" left of the ")
        assert ans == ("yes" if by_name[a].centre[0] < by_name[b].centre[0] else "no")
    elif kind == "exists":
        name = text.removeprefix("Is there a ").removesuffix("?")
        assert ans == ("yes" if name in by_name else "no")
    elif kind == "on":
        base = text.removeprefix("What is on the ").removesuffix("?")
        top = by_name[ans]
        assert objs[top.on].name == base and len(ans.split()) == 2
        assert points[labels == objs.index(top), 2].min() >= points[labels == top.on, 2].max() - 0.04  # touching, with jitter
    else:
        raise AssertionError(kind)


def test_answers_are_true_of_the_scene():
    kinds = set()
    for i in range(150):
        scene, points, labels = generate(0, "train", i, CFG)
        assert len({o.colour for o in scene.objects}) == len(scene.objects)  # colours name objects
        for j, o in enumerate(scene.objects):  # the points of an object carry its colour and lie in its box
            mine = points[labels == j]
            assert np.allclose(mine[:, 3:].mean(0), COLOURS[o.colour], atol=0.02)
            assert np.all(np.abs(mine[:, :3] - o.centre) <= np.asarray(o.extent) / 2 + 0.03)
        for q in scene.questions:
            _check(scene, points, labels, q)
            kinds.add(q["kind"])
            assert 1 <= len(q["answer"].split()) <= 2
    assert kinds == {"count", "count_shape", "colour", "shape", "size", "left", "exists", "on"}


def test_yes_no_balanced(tmp_path):
    build(tmp_path, {"train": 120}, seed=0, cfg=CFG)
    ans = [q["answer"] for line in open(tmp_path / "train.jsonl") for q in json.loads(line)["questions"]
           if q["kind"] in ("left", "exists")]
    share = ans.count("yes") / len(ans)
    assert 0.35 < share < 0.65
