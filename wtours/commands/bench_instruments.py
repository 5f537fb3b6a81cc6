"""``wtours bench instruments``: calibration of every instrument (:mod:`wtours.bench.instruments`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wtours.bench import instruments as lib


def cli_main(args: Any) -> int:
    _, table = lib.run_instruments(args)
    print(table)
    print(f"wrote {Path(args.out) / 'instruments.json'}")
    return 0
