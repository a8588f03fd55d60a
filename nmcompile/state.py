"""Per-layer sparsity state: permutation and step counter, keyed weakly by the weight parameter.

The state lives outside the compiled graphs and enters them as tensor inputs, so changing it
never recompiles. One registry maps each weight ``nn.Parameter`` to its ``LayerState``; graph
breaks or recompiles that see the same parameter share one state (SPEC §5, §9).
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from nmcompile import reference


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What a layer's state depends on; a different spec for the same parameter resets the state."""

    name: str
    index: int
    rows: int
    n: int
    m: int
    backward: str
    perm_candidates: int
    perm_interval: int
    seed: int
    layout: str = "out_in"  # "in_out": the parameter is stored as [K, O] (used as x @ W)
    groups: int = 1  # grouped convolution: the permutation stays inside each group of O/groups rows


def candidate_generator(seed: int, layer_index: int, step: int) -> torch.Generator:
    """A CPU generator seeded by ``(seed, layer index, step)`` only (SPEC §5): same on every rank."""
    digest = hashlib.blake2b(f"{seed}:{layer_index}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def permutation_candidates(spec: LayerSpec, step: int) -> list[torch.Tensor]:
    """The ``perm_candidates`` random row permutations of a search step, drawn in order from
    ``candidate_generator``; with groups, one ``randperm`` per group, kept inside the group."""
    generator = candidate_generator(spec.seed, spec.index, step)
    size = spec.rows // spec.groups
    return [
        torch.cat([torch.randperm(size, generator=generator) + g * size for g in range(spec.groups)])
        for _ in range(spec.perm_candidates)
    ]


class LayerState:
    """Mutable state of one sparsified weight: permutation ``perm`` (bimask) and step counter."""

    def __init__(self, spec: LayerSpec, device: torch.device, owner: torch.nn.Module | None) -> None:
        self.spec = spec
        self.perm = torch.arange(spec.rows, device=device)
        self.step = torch.zeros((), dtype=torch.int64)
        self.last_search_step: int | None = None
        self._owner = weakref.ref(owner) if owner is not None else None

    def is_training_forward(self) -> bool:
        """A training step is a forward with grad enabled while the owning module is in train mode."""
        if not torch.is_grad_enabled():
            return False
        owner = self._owner() if self._owner is not None else None
        return owner.training if owner is not None else True

    def weight_matrix(self, param: torch.Tensor) -> torch.Tensor:
        """The parameter as the ``[O, K]`` matrix ``W`` of SPEC §1 (detached)."""
        w = param.detach()
        return w.t() if self.spec.layout == "in_out" else w

    def begin_training_step(self, param: torch.Tensor) -> None:
        """Run the permutation search if this step is a search step (every ``perm_interval``, from 0)."""
        spec = self.spec
        step = int(self.step)
        if spec.backward != "bimask" or step % spec.perm_interval or self.last_search_step == step:
            return
        with torch.no_grad():
            w = self.weight_matrix(param)
            fmask = reference.nm_mask(w, spec.n, spec.m, dim=1)
            candidates = permutation_candidates(spec, step)
            best, _ = reference.search_permutation(fmask, self.perm, candidates, spec.n, spec.m)
            self.perm.copy_(best)
        self.last_search_step = step

    def end_training_step(self) -> None:
        """Count one finished training forward."""
        self.step += 1

    def summary(self, param: torch.Tensor) -> dict[str, Any]:
        """Read-only view: permutation, step, and the kept fraction of forward weights in the backward."""
        spec = self.spec
        with torch.no_grad():
            w = self.weight_matrix(param)
            if spec.backward == "transposable":
                fmask = reference.transposable_mask(w, spec.n, spec.m)
            else:
                fmask = reference.nm_mask(w, spec.n, spec.m, dim=1)
            kept = fmask.sum().item()
            if spec.backward == "bimask":
                score = reference.permutation_score(fmask, self.perm, spec.n, spec.m)
                kept_fraction = score / kept if kept else 1.0
            else:
                kept_fraction = 1.0
        return {
            "perm": self.perm.detach().clone(),
            "step": int(self.step),
            "kept_fraction": kept_fraction,
            "n": spec.n,
            "m": spec.m,
            "backward": spec.backward,
            "layer_index": spec.index,
            "last_search_step": self.last_search_step,
        }


class StateRegistry:
    """Maps weight parameters (weakly, by identity) to their ``LayerState``."""

    def __init__(self) -> None:
        self._states: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def get_or_create(self, weight: torch.Tensor, spec: LayerSpec, owner: torch.nn.Module | None) -> LayerState:
        """The state of ``weight``; a new one if none exists or its spec changed."""
        state = self._states.get(weight)
        if state is None or state.spec != spec:
            state = LayerState(spec, weight.device, owner)
            self._states[weight] = state
        return state

    def get(self, weight: torch.Tensor) -> LayerState | None:
        """The state of ``weight`` or ``None``."""
        return self._states.get(weight)

    def __len__(self) -> int:
        return len(self._states)


DEFAULT_REGISTRY = StateRegistry()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module behind a ``torch.compile`` wrapper (``OptimizedModule``)."""
    return getattr(model, "_orig_mod", model)


def sparsity_state(model: torch.nn.Module, registry: StateRegistry = DEFAULT_REGISTRY) -> dict[str, dict[str, Any]]:
    """Per sparsified weight (named as ``model.named_parameters()`` spells it): perm, step, kept_fraction."""
    out: dict[str, dict[str, Any]] = {}
    for name, param in unwrap(model).named_parameters():
        state = registry.get(param)
        if state is not None:
            out[name] = state.summary(param)
    return out
