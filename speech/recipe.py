"""What every training recipe's command line shares: flags from its config dataclass, ``--quick``,
``--json PATH``, and a readable table of the final report."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any


def parse_recipe_args(config_cls: type, argv: list[str] | None, prog: str, description: str,
                      choices: dict[str, list[str]] | None = None) -> tuple[Any, bool, Path | None]:
    """One ``--flag`` per config field (its default and type), plus ``--quick`` and ``--json``."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    defaults = asdict(config_cls())
    for f in fields(config_cls):
        default = defaults[f.name]
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(default, bool):  # --flag / --no-flag: type=bool would read "False" as True
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            p.add_argument(flag, type=type(default), default=default, choices=(choices or {}).get(f.name))
    p.add_argument("--quick", action="store_true", help="a few steps of a tiny model (smoke run, under a minute)")
    p.add_argument("--json", type=Path, help="write the evaluation figures here")
    args = vars(p.parse_args(argv))
    quick, json_path = args.pop("quick"), args.pop("json")
    return config_cls(**args), quick, json_path


def finish_report(report: dict[str, Any], keys: list[str], json_path: Path | None) -> None:
    print(f"\n{'metric':<22}{'value':>12}")
    for k in keys:
        v = report.get(k, float("nan"))
        print(f"{k:<22}{v:>12.3f}" if isinstance(v, float) else f"{k:<22}{v!s:>12}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
        print(f"wrote {json_path}")
