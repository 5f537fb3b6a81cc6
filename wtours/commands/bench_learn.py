"""``wtours bench learn``: proof that training learns (:mod:`wtours.bench.learn`), or with ``--curve`` a
learning curve (:mod:`wtours.bench.curve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def cli_main(args: Any) -> int:
    if getattr(args, "curve", False):  # a learning curve (make proof-long)
        from wtours.bench.curve import run_curve

        run, stem = run_curve, "curve"
    else:
        from wtours.bench.learn import run_learn

        run, stem = run_learn, "proof"
    _, text = run(args)
    out = Path(args.out)
    print(text)
    print(f"wrote {out / f'{stem}.json'}, {out / f'{stem}.md'}, {out / f'{stem}.png'}"
          + (f"; updated {args.readme}" if args.readme else ""))
    return 0
