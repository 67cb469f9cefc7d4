"""What `--codes` / config index.codes name: the kind of compressed codes of an index (codes.py does the arithmetic).
Imports nothing heavy, so entry points and config checks can refuse a bad value before jax loads."""

from __future__ import annotations

import dataclasses


class CodesError(ValueError):
    """A codes specification or codes file that cannot be used; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class CodesSpec:
    """What `--codes` asks for: kind "int8" or "pq" (with m sub-vectors)."""

    kind: str
    m: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind == "int8" else f"pq:{self.m}"

    def bytes_per_row(self, dim: int) -> int:
        """Bytes the devices hold per passage (codes + scale; bias excluded)."""
        return dim + 4 if self.kind == "int8" else self.m

    def check_dim(self, dim: int, where: str = "--codes") -> None:
        if self.kind == "pq" and dim % self.m:
            divisors = [m for m in range(1, dim + 1) if dim % m == 0 and m <= 256]
            raise CodesError(f"{where}={self}: M={self.m} does not divide the vectors' {dim} dimensions; pick M among "
                             f"{divisors[-8:]} (M bytes a passage)")


def parse_spec(text: str, where: str = "--codes") -> CodesSpec:
    """'int8' or 'pq:M' (1 <= M) -> CodesSpec; CodesError naming `where` otherwise."""
    text = (text or "").strip()
    if text == "int8":
        return CodesSpec("int8")
    if text.startswith("pq:"):
        digits = text[3:]
        if digits.isdigit() and int(digits) >= 1:
            return CodesSpec("pq", int(digits))
    raise CodesError(f"{where}={text!r}: expected 'int8' (per-row scaled 8-bit) or 'pq:M' (product quantisation, M "
                     "sub-vectors of one byte, M dividing the dimension), e.g. pq:48")
