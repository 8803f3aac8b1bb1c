"""Tile-config table of the ATMM Triton kernels: which tile shape to launch for which input shape.

VaLoRA's adaptive tiling: the best tile shape of a grouped LoRA product depends on the shape of the batch,
so an offline profiler (``python -m vision.lora.profile``) times candidate tiles per shape and writes the
winners to a JSON table per GPU model; at run time each launch looks its shape up, and a miss falls back
to a default (vLLM's fixed default heuristic, so a missing table is never worse than that baseline).

Keys are bucketed so that a table of a few hundred entries covers every batch:

* ``tokens``: the *real* number of LoRA tokens in the batch (base-only tokens excluded), rounded up to a
  power of two in [16, 8192] (the official VaLoRA table keys on the first request's length only);
* ``adapters``: the number of adapters present in the batch (segments), rounded up to a power of two, <= 64;
* ``hidden``: the model dimension of the product: d_in for the shrink (d_in -> r), d_out for the expand
  (r -> d_out). The shrink's cost does not depend on d_out, nor the expand's on d_in, so one entry serves
  every layer with that dimension;
* ``rank``: the largest rank present, rounded up to a power of two in [8, 256].

Shrink and expand have separate entries (``op``). Files live in ``vision/lora/tile_configs/<slug>.json``
where ``slug`` is the lower-cased device name with runs of other characters replaced by ``-``
(``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``). A table is read once per device and cached.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

TABLE_DIR = Path(__file__).with_name("tile_configs")
OPS = ("shrink", "expand")
FORMAT_VERSION = 1


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration of a shrink or expand kernel.

    ``block_m`` tokens x ``block_n`` output columns per program, ``block_k`` of the reduction per step;
    ``split_k`` > 1 (shrink only) splits the reduction over that many programs that add atomically.
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not (_is_pow2(v) and 16 <= v <= 1024):  # tl.dot needs every block dimension >= 16
                raise ValueError(f"TileConfig.{name} must be a power of two in [16, 1024], got {v}")
        if not (_is_pow2(self.split_k) and self.split_k <= 128):
            raise ValueError(f"TileConfig.split_k must be a power of two <= 128, got {self.split_k}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"TileConfig.num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"TileConfig.num_stages must be in [1, 8], got {self.num_stages}")

    @classmethod
    def from_dict(cls, d: dict) -> TileConfig:
        known = {k: int(d[k]) for k in ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages") if k in d}
        return cls(**known)

    def short(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}/s{self.split_k}/w{self.num_warps}/p{self.num_stages}"


def bucket_pow2(n: int, lo: int, hi: int) -> int:
    """``n`` rounded up to a power of two, clamped to [lo, hi] (lo and hi powers of two)."""
    b = lo
    while b < n and b < hi:
        b *= 2
    return b


@dataclass(frozen=True)
class TileKey:
    """A bucketed table key; build it with :func:`make_key` so that the fields are bucketed."""

    op: str
    tokens: int
    adapters: int
    hidden: int
    rank: int

    def __str__(self) -> str:
        return f"{self.op}/t{self.tokens}/a{self.adapters}/h{self.hidden}/r{self.rank}"

    @classmethod
    def parse(cls, s: str) -> TileKey:
        m = re.fullmatch(r"(shrink|expand)/t(\d+)/a(\d+)/h(\d+)/r(\d+)", s)
        if m is None:
            raise ValueError(f"bad tile-table key {s!r}: expected like 'shrink/t1024/a8/h4096/r64'")
        return cls(m[1], int(m[2]), int(m[3]), int(m[4]), int(m[5]))


def make_key(op: str, *, tokens: int, adapters: int, hidden: int, rank: int) -> TileKey:
    """The bucketed key of one launch: ``tokens`` real LoRA tokens, ``adapters`` segments, ``rank`` max rank."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return TileKey(op, bucket_pow2(tokens, 16, 8192), bucket_pow2(adapters, 1, 64), int(hidden),
                   bucket_pow2(rank, 8, 256))


def default_config(op: str, tokens: int) -> TileConfig:
    """The fallback on a miss: vLLM's fixed default heuristic (also the Punica/SGMV-style baseline's tiles)."""
    if op == "shrink":
        small = tokens < 128
        return TileConfig(block_m=32, block_n=16, block_k=256 if small else 32, split_k=64 if small else 8,
                          num_warps=4, num_stages=2)
    return TileConfig(block_m=64, block_n=128, block_k=32, split_k=1, num_warps=4, num_stages=2)


@dataclass
class TileTable:
    """Profiled winners of one device: ``entries[key] = config``; ``meta`` says how they were measured."""

    device: str
    entries: dict[TileKey, TileConfig] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def lookup(self, op: str, *, tokens: int, adapters: int, hidden: int, rank: int) -> TileConfig:
        """The profiled config of this shape's bucket, or :func:`default_config` on a miss."""
        key = make_key(op, tokens=tokens, adapters=adapters, hidden=hidden, rank=rank)
        hit = self.entries.get(key)
        return hit if hit is not None else default_config(op, tokens)

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT_VERSION, "device": self.device, "meta": self.meta,
            "entries": {str(k): asdict(v) for k, v in sorted(self.entries.items(), key=lambda kv: str(kv[0]))},
        }, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> TileTable:
        """Parse a table; raises ValueError naming ``source`` and what is wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"tile table {source} is not valid JSON ({e}); re-run python -m vision.lora.profile") from e
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            raise ValueError(f"tile table {source} has no 'entries' object; re-run python -m vision.lora.profile")
        if data.get("format", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(f"tile table {source} has format {data.get('format')}, this code reads {FORMAT_VERSION}")
        entries = {}
        for k, v in data["entries"].items():
            try:
                entries[TileKey.parse(k)] = TileConfig.from_dict(v)
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"tile table {source}: bad entry {k!r}: {e}") from e
        return cls(device=str(data.get("device", "")), entries=entries, meta=dict(data.get("meta", {})))


def device_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def table_path(device_name: str, directory: Path | None = None) -> Path:
    return (directory or TABLE_DIR) / f"{device_slug(device_name)}.json"


def read_table(path: str | Path) -> TileTable:
    """Strict read: ValueError if the file is corrupt, FileNotFoundError if it is missing."""
    path = Path(path)
    return TileTable.from_json(path.read_text(), source=str(path))


def write_table(table: TileTable, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(table.to_json())
    tmp.replace(path)  # atomic: a reader never sees half a table
    return path


@functools.lru_cache(maxsize=16)
def load_table(device_name: str, directory: Path | None = None) -> TileTable:
    """The table of ``device_name``, read once and cached; empty (all defaults) if there is none.

    A corrupt file must not take the server down: it warns and serves defaults.
    """
    path = table_path(device_name, directory)
    if not path.exists():
        return TileTable(device=device_name)
    try:
        return read_table(path)
    except (ValueError, OSError) as e:
        warnings.warn(f"ignoring tile table: {e}; using default tiles", RuntimeWarning, stacklevel=2)
        return TileTable(device=device_name)


def clear_cache() -> None:
    """Forget loaded tables (after the profiler wrote a new one, or in tests)."""
    load_table.cache_clear()
    _device_name.cache_clear()


@functools.lru_cache(maxsize=16)
def _device_name(device_type: str, index: int | None) -> str:
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_name(index)
    return device_type


def lookup(op: str, *, tokens: int, adapters: int, hidden: int, rank: int, device=None) -> TileConfig:
    """Tile config for one launch on ``device`` (a torch.device; None or CPU -> the 'cpu' table, i.e. defaults)."""
    dev_type = getattr(device, "type", "cpu")
    name = _device_name(dev_type, getattr(device, "index", None))
    return load_table(name).lookup(op, tokens=tokens, adapters=adapters, hidden=hidden, rank=rank)
