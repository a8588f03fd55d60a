"""Validated options of the ``nmsparse`` backend (one dataclass, SPEC §2–§6, §10)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

try:  # Dynamo re-raises ShortenTraceback subclasses unchanged instead of wrapping them.
    from torch._dynamo.exc import ShortenTraceback as _PassThrough
except ImportError:  # pragma: no cover - older torch
    _PassThrough = RuntimeError  # type: ignore[assignment,misc]

BACKWARD_MODES = ("bimask", "transposable", "dense")
INNER_COMPILERS = ("inductor", "aot_eager")


class SparsityConfigError(ValueError, _PassThrough):  # type: ignore[misc]
    """A bad option: a ``ValueError`` that reaches the caller of ``torch.compile`` unwrapped."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.first_useful_frame = None  # read by dynamo when it re-raises ShortenTraceback errors


def _fail(key: str, value: Any, allowed: str) -> None:
    raise SparsityConfigError(f"nmsparse option {key}={value!r} is invalid: allowed {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """All options of the backend; every field is checked in ``__post_init__``."""

    n: int = 2
    m: int = 4
    backward: str = "bimask"
    perm_candidates: int = 100
    perm_interval: int = 100
    srste_lambda: float = 2e-4
    seed: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    inner: str = "inductor"

    def __post_init__(self) -> None:
        if not _is_int(self.m) or not 2 <= self.m <= 32:
            _fail("m", self.m, "an int in 2..32")
        if not _is_int(self.n) or not 1 <= self.n <= self.m:
            _fail("n", self.n, f"an int with 1 <= n <= m (m={self.m})")
        if self.backward not in BACKWARD_MODES:
            _fail("backward", self.backward, f"one of {BACKWARD_MODES}")
        if not _is_int(self.perm_candidates) or self.perm_candidates < 0:
            _fail("perm_candidates", self.perm_candidates, "an int >= 0")
        if not _is_int(self.perm_interval) or self.perm_interval < 1:
            _fail("perm_interval", self.perm_interval, "an int >= 1")
        lam = self.srste_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0 or lam == float("inf"):
            _fail("srste_lambda", lam, "a finite float >= 0")
        object.__setattr__(self, "srste_lambda", float(lam))
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            _fail("seed", self.seed, "an int in [0, 2**63)")
        for key in ("include", "exclude"):
            object.__setattr__(self, key, _patterns(key, getattr(self, key)))
        if self.inner not in INNER_COMPILERS:
            _fail("inner", self.inner, f"one of {INNER_COMPILERS}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | SparsityConfig | None = None, **kwargs: Any) -> SparsityConfig:
        """Build from a mapping and/or keywords; an unknown key is a ``ValueError`` naming it."""
        if isinstance(options, SparsityConfig):
            if not kwargs:
                return options
            options = dataclasses.asdict(options)
        merged = {**(options or {}), **kwargs}
        if not isinstance(merged, dict):  # pragma: no cover - Mapping guarantees this
            raise SparsityConfigError(f"nmsparse options must be a mapping, got {type(options).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in merged.items():
            if key not in known:
                _fail(str(key), value, f"known options are {sorted(known)}")
        return cls(**merged)

    def name_filter_reason(self, name: str) -> str | None:
        """Why ``include``/``exclude`` leave the parameter ``name`` dense, or ``None`` if they keep it."""
        if self.include and not any(re.search(p, name) for p in self.include):
            return f"name not matched by include={list(self.include)}"
        for pattern in self.exclude:
            if re.search(pattern, name):
                return f"name matched by exclude pattern {pattern!r}"
        return None


def _patterns(key: str, value: Any) -> tuple[str, ...]:
    """Normalise ``include``/``exclude`` to a tuple of compiled-checked regex strings."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        _fail(key, value, "a regex string or a list of regex strings")
    for pattern in items:
        try:
            re.compile(pattern)
        except re.error as err:
            _fail(key, pattern, f"a valid regular expression ({err})")
    return tuple(items)
