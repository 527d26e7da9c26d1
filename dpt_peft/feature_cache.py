"""Class-side features kept between calls when nothing they depend on has changed.

Encoding every class prompt is the text encoder's whole work; at inference (no gradient) the result only
changes when the prompts, the class names, the device, the dtype or autocast change. Each entry carries a
stamp of those, and a lookup with another stamp recomputes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


class ClassFeatureCache:
    """Features keyed by `(adapter_name, ...)`, valid while their stamp is unchanged and no gradient is needed."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[Hashable, torch.Tensor]] = {}

    def get(self, key: tuple, stamp: Hashable, compute: Callable[[], torch.Tensor], enabled: bool) -> torch.Tensor:
        if torch.is_grad_enabled() or not enabled:
            return compute()
        hit = self._entries.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        features = compute()
        self._entries[key] = (stamp, features)
        return features

    def clear(self, adapter_name: str | None = None) -> None:
        """Forget one adapter's entries (its prompts or class names changed), or all of them."""
        for key in [k for k in self._entries if adapter_name is None or k[0] == adapter_name]:
            del self._entries[key]
