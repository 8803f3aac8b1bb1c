"""The synthetic instruction data (vision/data.py): deterministic, split cleanly, and right about its images."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vision.data import (
    IMAGE_TASKS,
    SPLITS,
    TEXT_TASKS,
    DataConfig,
    build,
    generate,
    is_correct,
    load_split,
    normalize_answer,
)
from vision.data_render import COLOURS, SHAPES, SIZE, draw_shape, region_name, render_count, render_single

TINY = DataConfig(images=(40, 12, 12), texts=(30, 10, 10), seed=7)


def _pixels_of(im: Image.Image, rgb: tuple[int, int, int], tol: int = 20) -> np.ndarray:
    a = np.asarray(im, dtype=np.int16)
    return (np.abs(a - np.array(rgb)).max(-1) <= tol)


def test_build_is_deterministic_from_the_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build(TINY, a, features=False, progress=False)
    build(TINY, b, features=False, progress=False)
    for split in SPLITS:
        assert (a / f"{split}.jsonl").read_text() == (b / f"{split}.jsonl").read_text()
    ex = load_split(a, "train")[0]
    assert np.array_equal(np.asarray(Image.open(a / ex.image)), np.asarray(Image.open(b / ex.image)))
    other = generate(DataConfig(images=TINY.images, texts=TINY.texts, seed=8), progress=False)
    assert [e.question for e in other["train"]] != [e.question for e in load_split(a, "train")]
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["seed"] == 7 and set(manifest["examples"]) == set(SPLITS)


def test_every_example_has_a_known_task_a_short_answer_and_its_image(tmp_path):
    build(TINY, tmp_path, features=False, progress=False)
    for split in SPLITS:
        exs = load_split(tmp_path, split)
        assert {e.modality for e in exs} == {"image", "text"}
        for e in exs:
            assert e.task in (IMAGE_TASKS if e.modality == "image" else TEXT_TASKS)
            assert 1 <= len(e.answer.split()) <= 2, e
            if e.modality == "image":
                im = Image.open(tmp_path / e.image)
                assert im.size == (SIZE, SIZE) and im.mode == "RGB"
            else:
                assert e.image is None
    # no text question is in two splits; val/test ask each at most once
    qs = {s: [e.question for e in load_split(tmp_path, s) if e.modality == "text"] for s in SPLITS}
    assert not set(qs["train"]) & set(qs["test"]) and not set(qs["val"]) & set(qs["test"])
    assert len(set(qs["test"])) == len(qs["test"])


def test_single_shape_answers_match_the_pixels():
    for seed in range(30):
        im, qas = render_single(random.Random(seed))
        by_task = {qa.task: qa for qa in qas}
        colour = by_task["colour"].answer
        mask = _pixels_of(im, COLOURS[colour])
        assert mask.sum() > 400, f"seed {seed}: too few {colour} pixels"
        for other, rgb in COLOURS.items():  # no other palette colour is drawn
            if other != colour:
                assert _pixels_of(im, rgb, tol=8).sum() < 20, (seed, colour, other)
        ys, xs = np.nonzero(mask)
        row, col = int(ys.mean() // (SIZE / 3)), int(xs.mean() // (SIZE / 3))
        assert by_task["grounding"].answer == region_name(row, col)
        assert by_task["shape"].answer in SHAPES


def _count_blobs(mask: np.ndarray) -> int:
    """4-connected components of a boolean mask (a plain flood fill)."""
    seen = np.zeros_like(mask)
    n = 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        n += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return n


def test_count_answer_matches_the_blobs_drawn():
    for seed in range(20):
        im, (qa,) = render_count(random.Random(100 + seed))
        bg = np.asarray(im)[0, 0]
        fg = np.abs(np.asarray(im, dtype=np.int16) - bg).max(-1) > 40
        n_blobs = _count_blobs(fg)
        assert n_blobs == len(qa.meta["objects"])  # shapes never touch
        assert int(qa.answer) == sum(o["shape"] == qa.meta["shape"] for o in qa.meta["objects"])
        assert 1 <= int(qa.answer) <= 6


def test_shapes_fill_roughly_their_expected_area():
    areas = {}
    for shape in SHAPES:
        im = Image.new("RGB", (100, 100), "white")
        draw_shape(ImageDraw.Draw(im), shape, 50, 50, 30, (0, 0, 0))
        areas[shape] = int(_pixels_of(im, (0, 0, 0)).sum())
    assert abs(areas["circle"] - np.pi * 30 ** 2) < 0.05 * np.pi * 30 ** 2
    assert areas["star"] < areas["square"] < areas["circle"]
    assert len(set(areas.values())) == len(SHAPES)


@pytest.mark.parametrize("pred, answer, ok", [
    ("Red.", "red", True), ("the circle", "circle", True), ("three", "3", True), ("Top Left", "top left", True),
    ("center", "centre", True), ("gray", "grey", True), ("12\nbecause", "12", True), ("red circle", "red", False),
    ("The answer is 4.", "4", False),
])
def test_normalized_exact_match(pred, answer, ok):
    assert is_correct(pred, answer) is ok
    assert normalize_answer(answer) == normalize_answer(normalize_answer(answer))
