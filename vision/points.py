"""Point clouds in: PLY / PCD (read with open3d) and ``.npy`` arrays → validated, normalised, grouped into patches.

The 3D model's spatial tokens are *point patches* (Point-BERT / Point-MAE's grouping, LLaVA-3D's pooling to a
capped count): farthest-point sampling picks ``M`` patch centres that cover the cloud, and each centre's ``k``
nearest points form its patch, in coordinates relative to the centre. The centre itself is the patch's 3D
position (embedded by the encoder).

Every user-facing failure is a :class:`PointCloudError` with a stable ``code``:
``invalid_point_cloud`` (unreadable, wrong shape, not finite), ``point_cloud_too_large`` (bytes or points over
the limits), ``point_cloud_too_small`` (fewer points than a patch needs), ``unsupported_point_format``,
``invalid_point_cloud_url`` (not a base64 data URL).

open3d needs ``libusb-1.0`` at import time on Debian (``apt-get install libusb-1.0-0``); without it only
``.npy`` input works and the error says what to install.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FORMATS = ("ply", "pcd", "npy")


class PointCloudError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class PointLimits:
    max_bytes: int = 32 * 1024 * 1024
    max_points: int = 1_000_000
    min_points: int = 16


@dataclass
class Cloud:
    """``xyz`` (N, 3) float32; ``rgb`` (N, 3) float32 in [0, 1] (grey 0.5 when the source has no colours)."""

    xyz: np.ndarray
    rgb: np.ndarray

    def __len__(self) -> int:
        return self.xyz.shape[0]

    def features(self) -> np.ndarray:
        """(N, 6) xyz + rgb."""
        return np.concatenate([self.xyz, self.rgb], axis=1).astype(np.float32)


def _open3d():
    try:
        import open3d  # noqa: PLC0415 - heavy, and absent system libraries must not break importing vision
    except ImportError as e:  # e.g. libusb-1.0.so.0 missing
        raise PointCloudError("unsupported_point_format",
                              f"PLY/PCD need open3d, which does not load here ({e}); on Debian: apt-get install "
                              "libusb-1.0-0. .npy arrays work without it") from None
    return open3d


def validate(xyz: np.ndarray, rgb: np.ndarray | None = None, limits: PointLimits = PointLimits()) -> Cloud:
    """Check shape, finiteness and size; colours in 0..255 are rescaled to [0, 1]."""
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise PointCloudError("invalid_point_cloud", f"points must have shape (N, 3), got {xyz.shape}")
    n = xyz.shape[0]
    if n > limits.max_points:
        raise PointCloudError("point_cloud_too_large", f"{n} points; at most {limits.max_points} are accepted")
    if n < limits.min_points:
        raise PointCloudError("point_cloud_too_small", f"{n} points; at least {limits.min_points} are needed")
    xyz = xyz.astype(np.float32)
    if not np.isfinite(xyz).all():
        raise PointCloudError("invalid_point_cloud", "the point cloud has NaN or infinite coordinates")
    if rgb is None:
        rgb = np.full((n, 3), 0.5, np.float32)
    else:
        rgb = np.asarray(rgb, dtype=np.float32)
        if rgb.shape != (n, 3):
            raise PointCloudError("invalid_point_cloud", f"colours {rgb.shape} do not match points ({n}, 3)")
        if not np.isfinite(rgb).all() or rgb.min() < 0:
            raise PointCloudError("invalid_point_cloud", "colours must be finite and non-negative")
        if rgb.max() > 1.0:
            if rgb.max() > 255.0:
                raise PointCloudError("invalid_point_cloud", "colours must be in 0..1 or 0..255")
            rgb = rgb / 255.0
    return Cloud(xyz, rgb)


def from_array(arr: np.ndarray, limits: PointLimits = PointLimits()) -> Cloud:
    """(N, 3) xyz or (N, 6) xyz + rgb."""
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape[1] not in (3, 6):
        raise PointCloudError("invalid_point_cloud", f"arrays must be (N, 3) xyz or (N, 6) xyzrgb, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise PointCloudError("invalid_point_cloud", f"arrays must be numeric, got {arr.dtype}")
    return validate(arr[:, :3], arr[:, 3:] if arr.shape[1] == 6 else None, limits)


def _format_of(path: Path, fmt: str | None) -> str:
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise PointCloudError("unsupported_point_format", f"point cloud format {fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt


def read_points(path: str | Path, limits: PointLimits = PointLimits(), fmt: str | None = None) -> Cloud:
    """A PLY / PCD (open3d) or ``.npy`` file → a validated :class:`Cloud` (not yet normalised)."""
    path = Path(path)
    fmt = _format_of(path, fmt)
    if not path.is_file():
        raise PointCloudError("invalid_point_cloud", f"no such point cloud file: {path.name}")
    if path.stat().st_size > limits.max_bytes:
        raise PointCloudError("point_cloud_too_large", f"file is over {limits.max_bytes // (1024 * 1024)} MB")
    if fmt == "npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise PointCloudError("invalid_point_cloud", f"not a readable .npy array: {e}") from None
        return from_array(arr, limits)
    o3d = _open3d()
    with _quiet(o3d):
        pcd = o3d.io.read_point_cloud(str(path), format=fmt)
    xyz = np.asarray(pcd.points)
    if xyz.shape[0] == 0:  # open3d prints a warning and returns an empty cloud on any read failure
        raise PointCloudError("invalid_point_cloud", f"no points could be read from this {fmt.upper()} file")
    rgb = np.asarray(pcd.colors) if pcd.has_colors() else None
    return validate(xyz, rgb, limits)


def read_points_bytes(raw: bytes, fmt: str, limits: PointLimits = PointLimits()) -> Cloud:
    """The bytes of a PLY / PCD / ``.npy`` file (e.g. from a data URL) → a :class:`Cloud`."""
    fmt = _format_of(Path("x"), fmt)
    if len(raw) > limits.max_bytes:
        raise PointCloudError("point_cloud_too_large", f"file is over {limits.max_bytes // (1024 * 1024)} MB")
    if fmt == "npy":
        try:
            return from_array(np.load(io.BytesIO(raw), allow_pickle=False), limits)
        except (ValueError, OSError, EOFError) as e:
            if isinstance(e, PointCloudError):
                raise
            raise PointCloudError("invalid_point_cloud", f"not a readable .npy array: {e}") from None
    fd, name = tempfile.mkstemp(suffix=f".{fmt}")  # open3d reads PLY/PCD from files only
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        return read_points(name, limits, fmt)
    finally:
        os.unlink(name)


def sniff_format(raw: bytes) -> str:
    """``ply`` / ``pcd`` / ``npy`` from a file's first bytes."""
    head = raw[:256].lstrip()
    if head.startswith(b"ply"):
        return "ply"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith((b"# .PCD", b"VERSION", b"FIELDS")):
        return "pcd"
    raise PointCloudError("invalid_point_cloud", "not a PLY, PCD or .npy file (by its first bytes): send one of "
                          "those, or name the format")


def read_points_url(url: str, limits: PointLimits = PointLimits(), fmt: str | None = None) -> Cloud:
    """A ``data:<any media type>;base64,<file>`` URL (what the API's point-cloud content part carries) → a Cloud.

    The format is ``fmt`` when given, otherwise sniffed from the file's first bytes. Remote URLs are refused."""
    if not url.startswith("data:"):
        raise PointCloudError("invalid_point_cloud_url", "point clouds must be sent as data URLs "
                              "(data:application/octet-stream;base64,<PLY, PCD or .npy file>)")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise PointCloudError("invalid_point_cloud_url", "point-cloud data URLs must be base64: data:<type>;base64,<data>")
    if len(payload) > limits.max_bytes * 4 // 3 + 4:
        raise PointCloudError("point_cloud_too_large", f"file is over {limits.max_bytes // (1024 * 1024)} MB")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise PointCloudError("invalid_point_cloud", "point-cloud data is not valid base64") from None
    return read_points_bytes(raw, fmt or sniff_format(raw), limits)


def write_points(path: str | Path, cloud: Cloud, binary: bool = True) -> None:
    """PLY / PCD through open3d, ``.npy`` as (N, 6) float32."""
    path = Path(path)
    fmt = _format_of(path, None)
    if fmt == "npy":
        np.save(path, cloud.features())
        return
    o3d = _open3d()
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(cloud.xyz.astype(np.float64)))
    pcd.colors = o3d.utility.Vector3dVector(cloud.rgb.astype(np.float64))
    with _quiet(o3d):
        ok = o3d.io.write_point_cloud(str(path), pcd, write_ascii=not binary)
    if not ok:
        raise OSError(f"open3d could not write {path}")


class _quiet:
    """Silence open3d's console warnings (a bad file is reported by our own error instead)."""

    def __init__(self, o3d) -> None:
        self.o3d = o3d

    def __enter__(self):
        self.level = self.o3d.utility.get_verbosity_level()
        self.o3d.utility.set_verbosity_level(self.o3d.utility.VerbosityLevel.Error)

    def __exit__(self, *exc) -> None:
        self.o3d.utility.set_verbosity_level(self.level)


# ---------------------------------------------------------------------------------------------- geometry
def normalise(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Centre on the bounding-box centre and scale so the farthest point is at distance 1.

    Returns ``(xyz', centre, scale)`` with ``xyz' = (xyz - centre) / scale``. The bounding-box centre (not
    the mean) keeps "left of" meaningful when one side has more points.
    """
    lo, hi = xyz.min(0), xyz.max(0)
    centre = (lo + hi) / 2
    scale = float(np.linalg.norm(xyz - centre, axis=1).max())
    scale = scale if scale > 1e-9 else 1.0
    return ((xyz - centre) / scale).astype(np.float32), centre, scale


def farthest_point_sample(xyz: Tensor, m: int) -> Tensor:
    """(B, N, 3) → (B, m) indices of ``m`` points that cover the cloud, greedily farthest from those chosen.

    Deterministic: the first point is the one farthest from the centroid (ties: the lowest index), so the
    result does not depend on a seed and hardly on the order of the points.
    """
    B, N, _ = xyz.shape
    if m > N:
        raise ValueError(f"cannot sample {m} patch centres from {N} points")
    idx = torch.empty(B, m, dtype=torch.long, device=xyz.device)
    far = (xyz - xyz.mean(1, keepdim=True)).square().sum(-1).argmax(1)  # (B,)
    dist = torch.full((B, N), float("inf"), device=xyz.device, dtype=xyz.dtype)
    rows = torch.arange(B, device=xyz.device)
    for i in range(m):
        idx[:, i] = far
        d = (xyz - xyz[rows, far].unsqueeze(1)).square().sum(-1)  # (B, N)
        dist = torch.minimum(dist, d)
        far = dist.argmax(1)
    return idx


def knn(xyz: Tensor, centres: Tensor, k: int) -> Tensor:
    """(B, N, 3), (B, M, 3) → (B, M, k) indices of each centre's ``k`` nearest points (itself first)."""
    d = torch.cdist(centres, xyz)  # (B, M, N)
    return d.topk(k, dim=-1, largest=False).indices


@dataclass
class Patches:
    """``points`` (B, M, k, 6): xyz relative to the centre, and rgb; ``centres`` (B, M, 3) in normalised space."""

    points: Tensor
    centres: Tensor

    @property
    def count(self) -> int:
        return self.points.shape[1]


def patchify(feats: Tensor, n_patches: int, patch_size: int) -> Patches:
    """(B, N, 6) normalised xyz + rgb → ``n_patches`` patches of ``patch_size`` points each."""
    if feats.dim() == 2:
        feats = feats.unsqueeze(0)
    xyz = feats[..., :3]
    with torch.no_grad():
        centre_idx = farthest_point_sample(xyz, n_patches)  # (B, M)
        centres = torch.gather(xyz, 1, centre_idx.unsqueeze(-1).expand(-1, -1, 3))  # (B, M, 3)
        nbr = knn(xyz, centres, patch_size)  # (B, M, k)
    B, M, k = nbr.shape
    pts = torch.gather(feats, 1, nbr.reshape(B, M * k, 1).expand(-1, -1, feats.shape[-1])).reshape(B, M, k, -1)
    pts = torch.cat([pts[..., :3] - centres.unsqueeze(2), pts[..., 3:]], dim=-1)
    return Patches(pts, centres)


def cloud_to_tensor(cloud: Cloud, n_points: int, seed: int = 0) -> Tensor:
    """Normalise and resample to exactly ``n_points`` (seeded subsampling, or repetition when short): (n_points, 6)."""
    xyz, _, _ = normalise(cloud.xyz)
    n = len(cloud)
    rng = np.random.default_rng(seed)
    if n >= n_points:
        keep = np.sort(rng.choice(n, n_points, replace=False))
    else:
        keep = np.concatenate([np.arange(n), rng.choice(n, n_points - n, replace=True)])
    return torch.from_numpy(np.concatenate([xyz[keep], cloud.rgb[keep]], axis=1).astype(np.float32))
