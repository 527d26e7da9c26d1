"""Where dpt_peft caches what it rebuilds on demand (decoded images, the toy CLIP): one root for every cache."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$DPT_PEFT_CACHE if set, else $XDG_CACHE_HOME/dpt_peft, else ~/.cache/dpt_peft (the XDG default)."""
    if os.environ.get("DPT_PEFT_CACHE"):
        return Path(os.environ["DPT_PEFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "dpt_peft"
