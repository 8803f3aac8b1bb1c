"""The point-patch encoder of the 3D LMM: patches of points → spatial tokens in the LM's width.

Shapes: B clouds; M patches (spatial tokens) per cloud; k points per patch; C encoder width; d the LM width.

    patches (B, M, k, 6) ──► mini-PointNet per patch (shared MLP, max-pool, local+global MLP, max-pool) ──► (B, M, C)
    centres (B, M, 3)    ──► position MLP (the patch's 3D position, LLaVA-3D's "3D patch" embedding)  ──► + (B, M, C)
                          ──► pre-norm Transformer encoder (``layers``) ──► LayerNorm ──► projector MLP ──► (B, M, d)

No 3D weights exist offline, so the encoder is trained here (``vision/train3d.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vision.points import Patches, patchify

LOCAL_SCALE = 8.0  # patch-relative coordinates are ~0.05 in normalised units: bring them near 1


@dataclass
class Encoder3DConfig:
    n_points: int = 1024  # a cloud is resampled to this many points
    n_patches: int = 64  # spatial tokens per cloud
    patch_size: int = 32  # points per patch
    dim: int = 128
    layers: int = 2
    heads: int = 4
    lm_dim: int = 576  # SmolLM2-135M's width

    def __post_init__(self) -> None:
        if self.n_patches > self.n_points or self.patch_size > self.n_points:
            raise ValueError("n_patches and patch_size must not exceed n_points")
        if self.dim % self.heads:
            raise ValueError("dim must be a multiple of heads")


class MiniPointNet(nn.Module):
    """Point-BERT's patch embedding: per-point MLP, max-pool, concat the pooled feature back, MLP, max-pool."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Linear(6, 64), nn.GELU(), nn.Linear(64, 64))
        self.second = nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, dim))

    def forward(self, pts: Tensor) -> Tensor:
        """(B, M, k, 6) → (B, M, C)."""
        x = torch.cat([pts[..., :3] * LOCAL_SCALE, pts[..., 3:] - 0.5], dim=-1)
        f = self.first(x)  # (B, M, k, 64)
        g = f.max(dim=2, keepdim=True).values.expand_as(f)
        return self.second(torch.cat([f, g], dim=-1)).max(dim=2).values


class PointPatchEncoder(nn.Module):
    def __init__(self, cfg: Encoder3DConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = MiniPointNet(cfg.dim)
        self.pos_embed = nn.Sequential(nn.Linear(3, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, cfg.dim))
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, 2 * cfg.dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, patches: Patches) -> Tensor:
        """Patches → (B, M, C) patch features."""
        x = self.patch_embed(patches.points) + self.pos_embed(patches.centres)
        return self.norm(self.blocks(x))

    def patchify(self, clouds: Tensor) -> Patches:
        """(B, n_points, 6) normalised clouds → patches, ordered left to right (by the centre's x).

        The order is the spatial tokens' order in the prompt: sorted, it tells the LM "left of" through the
        positions it already understands, and pruning (which keeps order) keeps that meaning."""
        p = patchify(clouds, self.cfg.n_patches, self.cfg.patch_size)
        order = p.centres[..., 0].argsort(dim=1)  # (B, M)
        pts = torch.gather(p.points, 1, order[:, :, None, None].expand_as(p.points))
        return Patches(pts, torch.gather(p.centres, 1, order.unsqueeze(-1).expand_as(p.centres)))


class Projector(nn.Module):
    """LLaVA-1.5's two-layer MLP from the encoder width to the LM's."""

    def __init__(self, dim: int, lm_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SpatialTokenizer(nn.Module):
    """Clouds → spatial tokens in the LM's width: encoder + projector (what the 3D LMM splices in)."""

    def __init__(self, cfg: Encoder3DConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = PointPatchEncoder(cfg)
        self.projector = Projector(cfg.dim, cfg.lm_dim)
        self.trained = False

    @property
    def tokens_per_cloud(self) -> int:
        return self.cfg.n_patches

    def forward(self, clouds: Tensor) -> Tensor:
        """(B, n_points, 6) normalised xyz + rgb → (B, M, d)."""
        return self.projector(self.encoder(self.encoder.patchify(clouds)))
