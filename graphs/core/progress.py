"""Progress bars for the long stages (calibration, the INT8 accuracy search, latency): tqdm on stderr, drawn only
when stderr is a terminal (tqdm's ``disable=None``), so logs, CI and pipes get the stage lines alone. Each bar is
cleared when its work ends (``leave=False``), leaving the one line per stage."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def bar(iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "") -> Any:
    """A tqdm bar over `iterable` (or a manual one of `total` steps, advanced with ``.update(n)``)."""
    # The size at the start, 80 x 24 where the terminal reports none: tqdm draws nothing at all on a terminal of
    # 0 rows (a pseudo-terminal nobody sized, as under `script` or a CI runner's tty).
    size = shutil.get_terminal_size()
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None, file=sys.stderr, ncols=size.columns,
                nrows=size.lines, mininterval=0.5, unit="step")
