"""Point-cloud input: PLY / PCD / .npy round trips through open3d and numpy, bad files with codes, normalisation,
farthest-point sampling and patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vision.points import (
    Cloud,
    PointCloudError,
    PointLimits,
    cloud_to_tensor,
    farthest_point_sample,
    from_array,
    knn,
    normalise,
    patchify,
    read_points,
    read_points_bytes,
    read_points_url,
    write_points,
)


def cloud(n: int = 500, seed: int = 0) -> Cloud:
    rng = np.random.default_rng(seed)
    return Cloud(rng.normal(size=(n, 3)).astype(np.float32), rng.random((n, 3)).astype(np.float32))


@pytest.mark.parametrize("suffix,binary", [("ply", True), ("ply", False), ("pcd", True), ("pcd", False), ("npy", True)])
def test_round_trip(tmp_path, suffix, binary):
    if suffix != "npy":
        pytest.importorskip("open3d")
    c = cloud()
    path = tmp_path / f"c.{suffix}"
    write_points(path, c, binary=binary)
    back = read_points(path)
    np.testing.assert_allclose(back.xyz, c.xyz, atol=1e-5)
    np.testing.assert_allclose(back.rgb, c.rgb, atol=1 / 255 + 1e-6)  # PLY stores colours as bytes
    again = read_points_bytes(path.read_bytes(), suffix)
    np.testing.assert_allclose(again.xyz, back.xyz)


def test_npy_xyz_only_and_0_255_colours(tmp_path):
    xyz = np.random.default_rng(1).normal(size=(40, 3))
    np.save(tmp_path / "a.npy", xyz)
    c = read_points(tmp_path / "a.npy")
    assert c.rgb.shape == (40, 3) and np.all(c.rgb == 0.5)
    c2 = from_array(np.concatenate([xyz, np.full((40, 3), 255.0)], 1))
    assert np.allclose(c2.rgb, 1.0)


@pytest.mark.parametrize("arr,code", [
    (np.zeros((10, 4)), "invalid_point_cloud"),
    (np.full((20, 3), np.nan), "invalid_point_cloud"),
    (np.zeros((5, 3)), "point_cloud_too_small"),
    (np.zeros((2000, 3)), "point_cloud_too_large"),
    (np.concatenate([np.zeros((20, 3)), np.full((20, 3), 300.0)], 1), "invalid_point_cloud"),
])
def test_bad_arrays(arr, code):
    with pytest.raises(PointCloudError) as e:
        from_array(arr, PointLimits(max_points=1000))
    assert e.value.code == code


def test_bad_files(tmp_path):
    pytest.importorskip("open3d")
    (tmp_path / "bad.ply").write_bytes(b"ply\nformat nonsense\n")
    (tmp_path / "bad.pcd").write_bytes(b"\x00\x01garbage")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    (tmp_path / "x.obj").write_bytes(b"v 0 0 0")
    for name in ("bad.ply", "bad.pcd", "bad.npy"):
        with pytest.raises(PointCloudError) as e:
            read_points(tmp_path / name)
        assert e.value.code == "invalid_point_cloud"
    with pytest.raises(PointCloudError) as e:
        read_points(tmp_path / "x.obj")
    assert e.value.code == "unsupported_point_format"
    with pytest.raises(PointCloudError) as e:
        read_points_bytes(b"x" * 100, "ply", PointLimits(max_bytes=10))
    assert e.value.code == "point_cloud_too_large"
    with pytest.raises(PointCloudError) as e:
        read_points(tmp_path / "missing.ply")
    assert e.value.code == "invalid_point_cloud"


def test_normalise_unit_scale():
    c = cloud()
    xyz, centre, scale = normalise(c.xyz * 7 + 3)
    assert np.isclose(np.linalg.norm(xyz, axis=1).max(), 1.0, atol=1e-5)
    np.testing.assert_allclose((xyz.min(0) + xyz.max(0)) / 2, 0, atol=1e-5)
    t = cloud_to_tensor(c, 256)
    assert t.shape == (256, 6) and torch.equal(t, cloud_to_tensor(c, 256))
    assert cloud_to_tensor(c, 800).shape == (800, 6)  # repeated when short


def test_fps_deterministic_and_covers():
    xyz = torch.from_numpy(cloud(2000, 3).xyz).unsqueeze(0)
    a, b = farthest_point_sample(xyz, 64), farthest_point_sample(xyz, 64)
    assert torch.equal(a, b) and a.unique().numel() == 64
    perm = torch.randperm(2000, generator=torch.Generator().manual_seed(0))  # hardly depends on the order
    c = perm[farthest_point_sample(xyz[:, perm], 64)]
    assert set(c[0].tolist()) == set(a[0].tolist())

    def cover(idx):  # the farthest any point is from its nearest centre
        return torch.cdist(xyz[0], xyz[0, idx[0]]).min(1).values.max()

    rand = torch.randperm(2000, generator=torch.Generator().manual_seed(1))[:64].unsqueeze(0)
    assert cover(a) < 0.8 * cover(rand)


def test_patches():
    feats = torch.cat([torch.from_numpy(cloud(1000, 4).xyz), torch.rand(1000, 3)], 1).unsqueeze(0).repeat(2, 1, 1)
    p = patchify(feats, 32, 16)
    assert p.points.shape == (2, 32, 16, 6) and p.centres.shape == (2, 32, 3)
    assert torch.allclose(p.points[:, :, 0, :3], torch.zeros(3))  # the centre is its own nearest point
    nb = knn(feats[..., :3], p.centres, 16)
    far = (feats[0, nb[0], :3] - p.centres[0].unsqueeze(1)).norm(dim=-1)
    assert torch.all(far[:, :1] <= far[:, 1:] + 1e-6)


@pytest.mark.parametrize("suffix", ["ply", "pcd", "npy"])
def test_data_urls(tmp_path, suffix):
    import base64

    if suffix != "npy":
        pytest.importorskip("open3d")
    c = cloud(64)
    write_points(tmp_path / f"c.{suffix}", c)
    b64 = base64.b64encode((tmp_path / f"c.{suffix}").read_bytes()).decode()
    got = read_points_url(f"data:application/octet-stream;base64,{b64}")  # format sniffed
    np.testing.assert_allclose(got.xyz, c.xyz, atol=1e-5)
    for url, code in [("https://x/c.ply", "invalid_point_cloud_url"), ("data:model/ply,abc", "invalid_point_cloud_url"),
                      ("data:model/ply;base64,@@@", "invalid_point_cloud"),
                      ("data:model/ply;base64," + base64.b64encode(b"hello").decode(), "invalid_point_cloud")]:
        with pytest.raises(PointCloudError) as e:
            read_points_url(url)
        assert e.value.code == code
