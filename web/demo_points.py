"""Point clouds for the demo's 3D tab: generated examples, file readers, a plotly view, the wire encoding.

Readers are plain numpy (open3d does not load on every machine this runs on): PLY (ascii and binary,
either byte order) and PCD (ascii and binary) with ``x y z`` and optional colours, and ``.npy`` arrays of
shape (N, 3) or (N, 6) (xyz + rgb in 0..1 or 0..255). Whatever the source, the cloud goes to the server
as one binary little-endian PLY, which the server reads as it reads any PLY.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_POINTS = 200_000  # larger clouds are subsampled (evenly, seeded) before they are shown or sent
VIEW_POINTS = 20_000  # what the browser draws
SCENES = ("test scene 1", "test scene 2", "test scene 3")  # held-out scenes of the 3D model's own data
EXAMPLES = (*SCENES, "cube", "sphere", "two boxes")


class PointCloudError(ValueError):
    """A file the demo cannot read as a point cloud; the message says what is wrong."""


@dataclass
class PointCloud:
    xyz: np.ndarray  # (N, 3) float32
    rgb: np.ndarray | None = None  # (N, 3) uint8
    name: str = "cloud"
    note: str = ""  # e.g. the questions a generated scene comes with, and their answers

    def __post_init__(self) -> None:
        if self.xyz.ndim != 2 or self.xyz.shape[1] != 3 or self.xyz.shape[0] == 0:
            raise PointCloudError(f"a point cloud needs (N, 3) coordinates with N > 0, got shape {self.xyz.shape}")
        if not np.isfinite(self.xyz).all():
            raise PointCloudError("the point cloud has NaN or infinite coordinates")
        if self.rgb is not None and self.rgb.shape != self.xyz.shape:
            raise PointCloudError(f"colours {self.rgb.shape} do not match points {self.xyz.shape}")

    def __len__(self) -> int:
        return self.xyz.shape[0]

    def subsample(self, n: int, seed: int = 0) -> PointCloud:
        if len(self) <= n:
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False))
        return PointCloud(self.xyz[keep], None if self.rgb is None else self.rgb[keep], self.name)


def example(name: str, n: int = 4096, seed: int = 0) -> PointCloud:
    """A generated cloud: a held-out scene of vision.scene3d (the kind the 3D model learned, with its
    questions and answers in ``note``), or points on the surface of a cube, of a sphere, or of two boxes."""
    rng = np.random.default_rng(seed)
    if name in SCENES:
        from vision.scene3d import SceneConfig, generate

        scene, pts, _ = generate(0, "test", int(name.rsplit(" ", 1)[1]) - 1, SceneConfig())
        note = "; ".join(f"*{q['question']}* → {q['answer']}" for q in scene.questions)
        return PointCloud(pts[:, :3].copy(), (pts[:, 3:] * 255).round().astype(np.uint8), name, note)
    if name == "cube":
        xyz = _box_surface(rng, n, np.zeros(3), np.ones(3))
        rgb = np.tile(np.array([[70, 130, 220]], np.uint8), (n, 1))
    elif name == "sphere":
        v = rng.normal(size=(n, 3))
        xyz = v / np.linalg.norm(v, axis=1, keepdims=True)
        rgb = ((xyz + 1) * 127.5).astype(np.uint8)
    elif name == "two boxes":
        a = _box_surface(rng, n // 2, np.array([-1.2, 0, 0]), np.array([0.8, 0.8, 0.8]))
        b = _box_surface(rng, n - n // 2, np.array([1.0, 0, -0.3]), np.array([0.5, 0.5, 1.1]))
        xyz = np.concatenate([a, b])
        rgb = np.concatenate([np.tile([[220, 80, 60]], (len(a), 1)), np.tile([[60, 170, 90]], (len(b), 1))]).astype(np.uint8)
    else:
        raise PointCloudError(f"no example named {name!r}; pick one of {', '.join(EXAMPLES)}")
    return PointCloud(xyz.astype(np.float32), rgb, name)


def _box_surface(rng: np.random.Generator, n: int, center: np.ndarray, half: np.ndarray) -> np.ndarray:
    """``n`` points uniform on the faces of an axis-aligned box (faces chosen by area)."""
    areas = np.array([half[1] * half[2], half[0] * half[2], half[0] * half[1]]).repeat(2)
    face = rng.choice(6, n, p=areas / areas.sum())
    p = rng.uniform(-1, 1, size=(n, 3))
    axis = face // 2
    p[np.arange(n), axis] = np.where(face % 2 == 0, -1.0, 1.0)
    return center + p * half


def load(path: str | Path) -> PointCloud:
    """A .ply, .pcd or .npy file → a cloud (subsampled to ``MAX_POINTS``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    data = path.read_bytes()
    if suffix == ".ply":
        cloud = read_ply(data)
    elif suffix == ".pcd":
        cloud = read_pcd(data)
    elif suffix == ".npy":
        cloud = read_npy(data)
    else:
        raise PointCloudError(f"{path.name}: upload a .ply, .pcd or .npy file")
    cloud.name = path.name
    return cloud.subsample(MAX_POINTS)


def read_npy(data: bytes) -> PointCloud:
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise PointCloudError(f"not a readable .npy array: {e}") from None
    if a.ndim != 2 or a.shape[1] not in (3, 6):
        raise PointCloudError(f"a .npy cloud must have shape (N, 3) or (N, 6) (xyz + rgb), not {a.shape}")
    xyz = a[:, :3].astype(np.float32)
    rgb = None
    if a.shape[1] == 6:
        c = a[:, 3:].astype(np.float64)
        rgb = np.clip(c * 255 if c.max(initial=0) <= 1.0 else c, 0, 255).astype(np.uint8)
    return PointCloud(xyz, rgb)


_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def read_ply(data: bytes) -> PointCloud:
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise PointCloudError("not a PLY file (no 'ply' magic or no end_header)")
    body_at = data.index(b"\n", end) + 1
    header = data[:end].decode("ascii", "replace").splitlines()
    fmt, elements = "", []  # [(name, count, [(prop, dtype)])]
    for line in header:
        words = line.split()
        if not words:
            continue
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements:
            if words[1] == "list":
                if elements[-1][0] == "vertex":
                    raise PointCloudError("PLY vertex lists are not supported")
                elements[-1][2].append((words[-1], None))
            else:
                elements[-1][2].append((words[2], _PLY_TYPES.get(words[1], "")))
    if not elements or elements[0][0] != "vertex":
        raise PointCloudError("the PLY file has no vertex element first")
    _, count, props = elements[0]
    names = [p for p, _ in props]
    if not {"x", "y", "z"} <= set(names):
        raise PointCloudError("the PLY vertices have no x, y, z properties")
    body = data[body_at:]
    if fmt == "ascii":
        rows = body.decode("ascii", "replace").split("\n")[:count]
        try:
            table = np.array([r.split()[: len(props)] for r in rows], dtype=np.float64)
        except ValueError:
            raise PointCloudError("the ASCII PLY body is not a table of numbers") from None
        col = {p: table[:, i] for i, p in enumerate(names)}
    elif fmt in ("binary_little_endian", "binary_big_endian"):
        order = "<" if fmt == "binary_little_endian" else ">"
        if any(not t for _, t in props):
            raise PointCloudError("the PLY vertices have a property of unknown type")
        dtype = np.dtype([(p, order + t) for p, t in props])
        if len(body) < dtype.itemsize * count:
            raise PointCloudError(f"the PLY file is truncated: {count} vertices announced")
        arr = np.frombuffer(body, dtype, count)
        col = {p: arr[p].astype(np.float64) for p in names}
    else:
        raise PointCloudError(f"unknown PLY format {fmt!r}")
    return _from_columns(col, count)


def read_pcd(data: bytes) -> PointCloud:
    lines, at = {}, 0
    while at < len(data):
        nl = data.find(b"\n", at)
        line = data[at: nl if nl >= 0 else len(data)].decode("ascii", "replace").strip()
        at = nl + 1 if nl >= 0 else len(data)
        if not line or line.startswith("#"):
            continue
        key, _, rest = line.partition(" ")
        lines[key.upper()] = rest.split()
        if key.upper() == "DATA":
            break
    if "FIELDS" not in lines or "DATA" not in lines:
        raise PointCloudError("not a PCD file (no FIELDS or DATA line)")
    fields = lines["FIELDS"]
    n = int(lines.get("POINTS", lines.get("WIDTH", ["0"]))[0])
    sizes = [int(s) for s in lines.get("SIZE", ["4"] * len(fields))]
    types = lines.get("TYPE", ["F"] * len(fields))
    counts = [int(c) for c in lines.get("COUNT", ["1"] * len(fields))]
    kind = lines["DATA"][0].lower()
    body = data[at:]
    if kind == "ascii":
        rows = [r.split() for r in body.decode("ascii", "replace").splitlines() if r.strip()][:n]
        try:
            table = np.array(rows, dtype=np.float64)
        except ValueError:
            raise PointCloudError("the ASCII PCD body is not a table of numbers") from None
        offsets = np.cumsum([0, *counts])
        col = {f: table[:, offsets[i]] for i, f in enumerate(fields)}
    elif kind == "binary":
        letter = {"F": "f", "I": "i", "U": "u"}
        dtype = np.dtype([(f, f"<{letter[t]}{s}", (c,)) if c > 1 else (f, f"<{letter[t]}{s}")
                          for f, s, t, c in zip(fields, sizes, types, counts, strict=True)])
        if len(body) < dtype.itemsize * n:
            raise PointCloudError(f"the PCD file is truncated: {n} points announced")
        arr = np.frombuffer(body, dtype, n)
        col = {f: arr[f] for f in fields}
    else:
        raise PointCloudError(f"PCD DATA {kind!r} is not supported (ascii, binary)")
    if "rgb" in col:  # packed 0x00RRGGBB: an integer field, or (as PCL writes it) a float's bits
        as_int = types[fields.index("rgb")].upper() in ("U", "I")
        packed = np.asarray(col.pop("rgb"), np.float64 if as_int else np.float32)
        packed = packed.astype(np.uint32) if as_int else packed.view(np.uint32)
        col["red"], col["green"], col["blue"] = (packed >> 16) & 255, (packed >> 8) & 255, packed & 255
    if not {"x", "y", "z"} <= set(col):
        raise PointCloudError("the PCD file has no x, y, z fields")
    return _from_columns(col, n)


def _from_columns(col: dict[str, np.ndarray], count: int) -> PointCloud:
    xyz = np.stack([col["x"], col["y"], col["z"]], 1).astype(np.float32)
    if xyz.shape[0] != count:
        raise PointCloudError(f"{count} points announced, {xyz.shape[0]} found")
    rgb = None
    if {"red", "green", "blue"} <= set(col):
        rgb = np.clip(np.stack([col["red"], col["green"], col["blue"]], 1), 0, 255).astype(np.uint8)
    return PointCloud(xyz, rgb)


def to_ply(cloud: PointCloud) -> bytes:
    """Binary little-endian PLY: float x y z, and uchar red green blue when the cloud has colours."""
    props = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if cloud.rgb is not None:
        props += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    arr = np.empty(len(cloud), np.dtype(props))
    arr["x"], arr["y"], arr["z"] = cloud.xyz.T
    if cloud.rgb is not None:
        arr["red"], arr["green"], arr["blue"] = cloud.rgb.T
    kinds = {"<f4": "float", "u1": "uchar"}
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(cloud)}",
              *(f"property {kinds[t]} {p}" for p, t in props), "end_header"]
    return ("\n".join(header) + "\n").encode() + arr.tobytes()


def data_url(cloud: PointCloud) -> str:
    """The content part's URL: ``data:application/octet-stream;base64,<PLY>``."""
    return "data:application/octet-stream;base64," + base64.b64encode(to_ply(cloud)).decode()


def figure(cloud: PointCloud):
    """A plotly 3D scatter of (a subsample of) the cloud, coloured by its colours or by height."""
    import plotly.graph_objects as go

    view = cloud.subsample(VIEW_POINTS)
    x, y, z = view.xyz.T
    if view.rgb is not None:
        color = [f"rgb({r},{g},{b})" for r, g, b in view.rgb.tolist()]
        marker = {"size": 2, "color": color}
    else:
        marker = {"size": 2, "color": z, "colorscale": "Viridis"}
    fig = go.Figure(go.Scatter3d(x=x, y=y, z=z, mode="markers", marker=marker, hoverinfo="skip"))
    fig.update_layout(margin={"l": 0, "r": 0, "t": 30, "b": 0}, height=420,
                      title={"text": f"{cloud.name}: {len(cloud):,} points", "font": {"size": 13}},
                      scene={"aspectmode": "data"})
    return fig
