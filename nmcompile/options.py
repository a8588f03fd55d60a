"""Validated options of the ``nmsparse`` backend (one dataclass, SPEC §2–§6, §10)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, NoReturn

from torch._dynamo.exc import ShortenTraceback  # dynamo re-raises its subclasses unchanged, not wrapped

BACKWARD_MODES = ("bimask", "transposable", "dense")
INNER_COMPILERS = ("inductor", "aot_eager")
GRAD_PRUNE_RULES = ("none", "mvue12", "mvue24", "mvue24_approx")
MASK_DECAYS = ("none", "linear", "exponential")
MASK_DECAY_RATE = 2e-4  # the default mask_decay_rate (SPEC §8)
KERNELS = ("auto", "triton", "portable", "sparse24")


class SparsityConfigError(ValueError, ShortenTraceback):
    """A bad option: a ``ValueError`` that reaches the caller of ``torch.compile`` unwrapped.
    ``option`` names the option it rejects (``None`` where ``options`` itself is not a mapping), so a
    command line can name its flag."""

    def __init__(self, message: str, option: str | None = None) -> None:
        Exception.__init__(self, message)
        self.option = option
        self.first_useful_frame = None  # read by dynamo when it re-raises ShortenTraceback errors


def power_of_two(m: int) -> bool:
    """Whether ``m`` is a power of two: what the Triton kernels' register tiles (and so the fused,
    the 2:4 and the CUDA mask paths) need of M."""
    return m > 0 and not m & (m - 1)


def structure_sequence(n: int, m: int) -> list[int]:
    """SPEC §8 structure decay: ``(m−1):m → m/2:m → m/4:m → … → n:m`` (1:8 gives 7, 4, 2, 1)."""
    if n >= m:
        return [m]
    sequence = [m - 1]
    value = m // 2
    while value > n:
        if value < sequence[-1]:
            sequence.append(value)
        value //= 2
    if sequence[-1] != n:
        sequence.append(n)
    return sequence


def _fail(key: str, value: Any, allowed: str) -> NoReturn:
    raise SparsityConfigError(f"nmsparse option {key}={value!r} is invalid: allowed {allowed}", option=key)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


class _DefaultLambda(float):
    """The SR-STE λ a config chose itself (``srste_lambda`` unset): a float that remembers it was
    not given, so a config rebuilt with another ``mask_decay`` (``from_options``,
    ``dataclasses.replace``) chooses again instead of reading it as the user's value."""


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """All options of the backend; every field is checked in ``__post_init__``.

    ``srste_lambda=None`` (the default) means ``2e-4``, or ``0`` when mask decay replaces SR-STE.
    """

    n: int = 2
    m: int = 4
    backward: str = "bimask"
    perm_candidates: int = 100
    perm_interval: int = 100
    perm_swaps: int = 0
    srste_lambda: float | None = None
    seed: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    inner: str = "inductor"
    grad_prune: str = "none"
    mask_decay: str = "none"
    mask_decay_rate: float = MASK_DECAY_RATE
    structure_decay: bool = False
    dense_steps: int = 0
    finetune_steps: int = 0
    total_steps: int | None = None
    kernels: str = "auto"

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
        if not _is_int(self.perm_swaps) or self.perm_swaps < 0:
            _fail("perm_swaps", self.perm_swaps, "an int >= 0")
        if self.perm_swaps and self.backward != "bimask":
            _fail("perm_swaps", self.perm_swaps, "0 unless backward='bimask' (nothing else reads it)")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            _fail("seed", self.seed, "an int in [0, 2**63)")
        for key in ("include", "exclude"):
            object.__setattr__(self, key, _patterns(key, getattr(self, key)))
        if self.inner not in INNER_COMPILERS:
            _fail("inner", self.inner, f"one of {INNER_COMPILERS}")
        if self.grad_prune not in GRAD_PRUNE_RULES:
            _fail("grad_prune", self.grad_prune, f"one of {GRAD_PRUNE_RULES}")
        if self.kernels not in KERNELS:
            _fail("kernels", self.kernels, f"one of {KERNELS}")
        self._check_schedules()

    def _check_schedules(self) -> None:
        """SPEC §6, §8: decay options, and SR-STE resolved against mask decay."""
        if self.mask_decay not in MASK_DECAYS:
            _fail("mask_decay", self.mask_decay, f"one of {MASK_DECAYS}")
        if not _is_finite_number(self.mask_decay_rate) or not self.mask_decay_rate > 0:
            _fail("mask_decay_rate", self.mask_decay_rate, "a finite float > 0")
        object.__setattr__(self, "mask_decay_rate", float(self.mask_decay_rate))  # an int rate too, as srste_lambda
        if not isinstance(self.structure_decay, bool):
            _fail("structure_decay", self.structure_decay, "True or False")
        for key in ("dense_steps", "finetune_steps"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 0:
                _fail(key, getattr(self, key), "an int >= 0")
        if self.total_steps is not None and (not _is_int(self.total_steps) or self.total_steps < 1):
            _fail("total_steps", self.total_steps, "None or an int >= 1")
        if self.total_steps is not None and not self.structure_decay:
            _fail("total_steps", self.total_steps, "None unless structure_decay=True (nothing else reads it)")
        if self.mask_decay_rate != MASK_DECAY_RATE and self.mask_decay == "none":
            _fail(
                "mask_decay_rate",
                self.mask_decay_rate,
                f"{MASK_DECAY_RATE} unless mask_decay is on (nothing else reads it)",
            )
        decaying = self.structure_decay or self.mask_decay != "none"
        if self.dense_steps and not decaying:
            _fail("dense_steps", self.dense_steps, "0 unless mask_decay or structure_decay is on")
        if self.finetune_steps and not self.structure_decay:
            _fail("finetune_steps", self.finetune_steps, "0 unless structure_decay=True")
        if self.structure_decay:
            if self.total_steps is None:
                _fail("total_steps", None, "an int: structure_decay=True needs total_steps")
            stages = [f"{k}:{self.m}" for k in structure_sequence(self.n, self.m)]
            span = self.total_steps - self.dense_steps - self.finetune_steps
            if span < len(stages):  # equal frames of at least one step each: no N:M of the sequence skipped
                _fail(
                    "total_steps",
                    self.total_steps,
                    f"at least dense_steps + finetune_steps + {len(stages)} (a step for each of {' -> '.join(stages)})",
                )
        lam = self.srste_lambda
        if lam is None or isinstance(lam, _DefaultLambda):
            object.__setattr__(self, "srste_lambda", _DefaultLambda(0.0 if self.mask_decay != "none" else 2e-4))
            return
        if not _is_finite_number(lam) or not lam >= 0:
            _fail("srste_lambda", lam, "a finite float >= 0")
        if lam > 0 and self.mask_decay != "none":
            _fail("srste_lambda", lam, "0 (or unset) with mask_decay: mask decay replaces SR-STE (SPEC §6)")
        object.__setattr__(self, "srste_lambda", float(lam))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | SparsityConfig | None = None, **kwargs: Any) -> SparsityConfig:
        """Build from a mapping and/or keywords; an unknown key is a ``ValueError`` naming it."""
        if isinstance(options, SparsityConfig):
            if not kwargs:
                return options
            options = dataclasses.asdict(options)
        if options is not None and not isinstance(options, Mapping):
            raise SparsityConfigError(
                f"nmsparse options must be a mapping (option: value), got {type(options).__name__} {options!r}"
            )
        merged = {**(options or {}), **kwargs}
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
