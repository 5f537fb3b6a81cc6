"""Rewrite the module paths issue 17 moved, in the files given (or every tracked .py / .sh / .md file):
for branches written against the old layout (``python scripts/issue17/rewrite_imports.py`` after a merge).

    wtours.train.pretrain -> wtours.stages.video.run       wtours.train.neco -> wtours.stages.neco.run
    wtours.train.video_*  -> wtours.stages.video.*         wtours.train.neco_* -> wtours.stages.neco.*
    wtours.augment        -> wtours.stages.video.augment   wtours.neco_augment -> wtours.stages.neco.crops
    wtours.train.schedules -> wtours.stages.video.schedules
    wtours.models.backbone_io, wtours.models.init_weights -> wtours.models.weights
    wtours.report (module) -> wtours.report (package; same names), wtours.pipeline.report -> wtours.report.chain,
    wtours.pipeline.tables -> wtours.report.tables; DoRAModule -> VideoModule (an alias remains)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

MOVES = [
    ("wtours.train.video_config", "wtours.stages.video.config"),
    ("wtours.train.video_module", "wtours.stages.video.module"),
    ("wtours.train.video_data", "wtours.stages.video.data"),
    ("wtours.train.pretrain", "wtours.stages.video.run"),
    ("wtours.train.schedules", "wtours.stages.video.schedules"),
    ("wtours.train.neco_config", "wtours.stages.neco.config"),
    ("wtours.train.neco_module", "wtours.stages.neco.module"),
    ("wtours.train.neco_data", "wtours.stages.neco.data"),
    ("wtours.train.neco", "wtours.stages.neco.run"),
    ("wtours.neco_augment", "wtours.stages.neco.crops"),
    ("wtours.augment", "wtours.stages.video.augment"),
    ("wtours.models.backbone_io", "wtours.models.weights"),
    ("wtours.models.init_weights", "wtours.models.weights"),
    ("wtours.pipeline.report", "wtours.report.chain"),
    ("wtours.pipeline.tables", "wtours.report.tables"),
]


def rewrite(text: str) -> str:
    for old, new in MOVES:
        text = re.sub(re.escape(old) + r"(?![\w])", new, text)
    return re.sub(r"\bDoRAModule\b(?! = VideoModule)", "VideoModule", text)


def main(argv: list[str]) -> int:
    files = argv or [f for f in subprocess.check_output(["git", "ls-files"], text=True).split()
                     if f.endswith((".py", ".sh", ".md")) and f != "scripts/issue17/rewrite_imports.py"]
    for f in files:
        p = Path(f)
        if not p.is_file():
            continue
        old = p.read_text()
        new = rewrite(old)
        if new != old:
            p.write_text(new)
            print(f"rewrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
