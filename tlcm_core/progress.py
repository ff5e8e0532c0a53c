"""How long work reports progress, tables and images without knowing who listens.

tlcm_core never imports prefect: the Prefect tasks pass a reporter that also writes Prefect artifacts;
the plain library default is a tqdm bar per stage.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("tlcm")


class Reporter:
    """Default reporter: tqdm progress bars and the `tlcm` logger. Subclass to forward elsewhere."""

    def __init__(self, bars: bool = True):
        self.bars = bars
        self._bars: dict[str, Any] = {}

    def progress(self, key: str, done: int, total: int, **metrics: float) -> None:
        if not self.bars:
            return
        from tqdm.auto import tqdm

        bar = self._bars.get(key)
        if bar is None or bar.total != total:
            bar = self._bars[key] = tqdm(total=total, desc=key, dynamic_ncols=True, leave=True)
        bar.n = done
        if metrics:
            bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()},
                            refresh=False)
        bar.refresh()
        if done >= total:
            bar.close()
            self._bars.pop(key, None)

    def log(self, message: str) -> None:
        log.info(message)

    def table(self, key: str, rows: list[dict], description: str = "") -> None:
        pass

    def image(self, key: str, png: bytes, description: str = "") -> None:
        pass

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


class SilentReporter(Reporter):
    def __init__(self):
        super().__init__(bars=False)
