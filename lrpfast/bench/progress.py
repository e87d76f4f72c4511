"""A progress bar: tqdm when installed, else a plain counter on stderr (the GPU machines have
no tqdm guarantee), or nothing with --no-progress."""
from __future__ import annotations

import sys


class Progress:
    def __init__(self, enabled: bool = True, desc: str = "bench"):
        self.total, self.done, self.enabled = 0, 0, enabled
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=0, desc=desc, unit="call", file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                self._bar = None
        self.desc = desc

    def add_total(self, n: int) -> None:
        self.total += n
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def set_description(self, text: str) -> None:
        self.desc = text
        if self._bar is not None:
            self._bar.set_description(text, refresh=True)

    def tick(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled:
            print(f"\r{self.desc}: {self.done}/{self.total} calls", end="", file=sys.stderr, flush=True)

    def write(self, line: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(line)
        else:
            if self.enabled and self.done:
                print(file=sys.stderr)
            print(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.done:
            print(file=sys.stderr)
