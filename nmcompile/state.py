"""Per-layer sparsity state: permutation, step counter and schedule, keyed weakly by the weight.

The state lives outside the compiled graphs and enters them as tensor inputs, so changing it
never recompiles. One registry maps each weight ``nn.Parameter`` to its ``LayerState``; graph
breaks or recompiles that see the same parameter share one state (SPEC §5, §8, §9).

Checkpoints (SPEC §9): ``model.state_dict()`` carries each layer's state in the state dict's
``_metadata`` (no extra keys, so any model loads the checkpoint, strict or not), and
``load_state_dict`` brings it back, also when it runs before the first compiled forward.
``SparsityStates`` carries the states on their own where ``_metadata`` is dropped (DCP).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import math
import pickle
import threading
import warnings
import weakref
from collections.abc import Collection, Iterator
from typing import Any

import torch
import torch.distributed.tensor
import torch.nn.utils.parametrize
import torch.nn.utils.prune
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from nmcompile import ops, reference
from nmcompile.options import SparsityConfig, power_of_two

METADATA_KEY = "nmsparse"


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """How a layer uses its state: the compiled layer's name, index, shape and options."""

    name: str
    index: int  # position of the weight in model.named_parameters(): seeds its random streams
    rows: int  # O
    backward: str  # the layer's own mode: "dense" where O % m rules out an N:M backward
    layout: str = "out_in"  # "in_out": the parameter is stored as [K, O] (used as x @ W)
    groups: int = 1  # grouped convolution: the permutation stays inside each group of O/groups rows
    config: SparsityConfig = dataclasses.field(default_factory=SparsityConfig)
    dtype: torch.dtype = torch.float32  # the weight's, as compiled: sets the mask-decay factor's dtype

    @property
    def graph_inputs(self) -> tuple[str, ...]:
        """The state tensors this layer's compiled graph takes, in order."""
        return graph_input_kinds(self.backward, self.config)

    @property
    def slot(self) -> str:
        """The parameter's name in its owning module (``weight``): the slot its state belongs to."""
        return self.name.rsplit(".", 1)[-1]


def alpha_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the mask-decay factor a layer's graph takes: float64 for a float64 weight, so α
    is not rounded where the reference multiplies by the exact Python float; else float32, as the
    Triton kernels read it (bf16/fp16 products are computed in fp32)."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def graph_input_kinds(backward: str, config: SparsityConfig) -> tuple[str, ...]:
    """State tensors a layer's graph takes, in order: ``perm`` (bimask), ``n_eff`` (structure
    decay), ``alpha`` (mask decay), ``step`` (MVUE seeding)."""
    kinds = [("perm", backward == "bimask"), ("n_eff", config.structure_decay),
             ("alpha", config.mask_decay != "none"), ("step", config.grad_prune != "none")]  # fmt: skip
    return tuple(kind for kind, used in kinds if used)


def candidate_generator(seed: int, layer_index: int, step: int) -> torch.Generator:
    """A CPU generator seeded by ``(seed, layer index, step)`` only (SPEC §5): same on every rank."""
    digest = hashlib.blake2b(f"{seed}:{layer_index}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def permutation_candidates(spec: LayerSpec, generator: torch.Generator) -> list[torch.Tensor]:
    """The ``perm_candidates`` random row permutations of a search step, drawn in order from its
    ``candidate_generator``; with groups, one ``randperm`` per group, kept inside the group."""
    size = spec.rows // spec.groups
    if spec.groups == 1:  # the same draws, without an add and a cat per candidate (small layers feel them)
        return [torch.randperm(size, generator=generator) for _ in range(spec.config.perm_candidates)]
    return [
        torch.cat([torch.randperm(size, generator=generator) + g * size for g in range(spec.groups)])
        for _ in range(spec.config.perm_candidates)
    ]


@dataclasses.dataclass
class Progress:
    """A weight's training progress: permutation, finished training forwards, last search step.
    Every ``LayerState`` of one weight (one per compile that uses it) shares one; ``trained_by``
    is the one that ran the last training step."""

    perm: torch.Tensor
    step: int = 0
    last_search_step: int | None = None
    trained_by: LayerState | None = None
    last_forward: Forward | None = None  # the last training forward, which a checkpoint may recompute
    dense_forward: bool = False  # the weight's last forward ran dense: a later compile left it so


@dataclasses.dataclass(frozen=True)
class Forward:
    """One forward through a layer: what it is and the step and permutation it runs with.

    ``kind`` is "train" (a training step: it searches, then counts), "recompute" (a non-reentrant
    activation checkpoint rerunning the layer's last training forward inside the backward: that
    forward's step and permutation, nothing counted) or "use" (eval mode or no grad). ``thread``
    is the thread that ran it.
    """

    kind: str
    step: int
    perm: torch.Tensor
    thread: int = dataclasses.field(default_factory=threading.get_ident)


def _outside_inference(perm: torch.Tensor) -> torch.Tensor:
    """``perm``, or a copy of it made outside ``inference_mode`` where it was made inside (a checkpoint
    loaded in an evaluation routine): the graphs save ``P`` for the backward, which an inference
    tensor cannot be, so every later training step would fail."""
    if not perm.is_inference():
        return perm
    with torch.inference_mode(False):
        return perm.clone()


def in_backward() -> bool:
    """Whether autograd is running a backward on this thread: a forward now is a checkpoint's recompute."""
    return torch._C._current_graph_task_id() != -1


def nm_forward_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``reference.nm_mask(w, n, m, dim=1)``, the forward mask of a weight matrix (or a conv weight,
    along ``C``), the fastest exact way outside the graphs: the C forward kernel for a 2-D fp32 CPU
    weight at M=4 (14-22x the composite op), else the composite op (M comparisons per entry, 4-6x
    the reference's sort on the CPU), else (a tensor subclass) the reference."""
    plain = type(w) is torch.Tensor
    if plain and w.dim() == 2:
        from nmcompile.kernels import cpu_mask

        if cpu_mask.blocker(w, m) is None:
            return cpu_mask.nm4_mask(w, n)
    return (ops.nm_mask if plain else reference.nm_mask)(w, n, m, 1)


class LayerState:
    """One sparsified weight's ``Progress`` as a compiled layer with ``spec`` uses it.

    The permutation is replaced, never changed in place, and the step enters graphs as a new tensor
    each call, so a backward still pending from an earlier forward sees the values it used.
    """

    def __init__(
        self, spec: LayerSpec, device: torch.device, owner: nn.Module | None, progress: Progress | None = None
    ) -> None:
        self.spec = spec
        self.progress = progress if progress is not None else Progress(torch.arange(spec.rows, device=device))
        self.device = device
        self._owner = weakref.ref(owner) if owner is not None else None
        self.holder: weakref.ref | None = None  # the anchor of the weight it serves (StateRegistry)

    def served(self) -> torch.Tensor | None:
        """The anchor of the weight this state serves while that weight lives, else ``None``."""
        return self.holder() if self.holder is not None else None

    @property
    def perm(self) -> torch.Tensor:
        """The weight-row permutation ``P`` in force (shared by every state of this progress)."""
        return self.progress.perm

    @perm.setter
    def perm(self, value: torch.Tensor) -> None:
        self.progress.perm = _outside_inference(value)

    @property
    def step(self) -> int:
        """Training steps counted so far: the ``t`` of the schedules (SPEC §5, §6)."""
        return self.progress.step

    @step.setter
    def step(self, value: int) -> None:
        self.progress.step = value

    @property
    def last_search_step(self) -> int | None:
        """The step of the last permutation search (``None`` before the first)."""
        return self.progress.last_search_step

    @last_search_step.setter
    def last_search_step(self, value: int | None) -> None:
        self.progress.last_search_step = value

    def reset(self) -> None:
        """Back to the start: identity permutation, step 0 (for every state sharing the progress)."""
        self.perm = torch.arange(self.spec.rows, device=self.device)
        self.step = 0
        self.last_search_step = None
        self.progress.last_forward = None

    def weight_matrix(self, param: torch.Tensor) -> torch.Tensor:
        """The parameter as the ``[O, K]`` matrix ``W`` of SPEC §1 (detached)."""
        w = param.detach()
        return w.t() if self.spec.layout == "in_out" else w

    def fits(self, param: torch.Tensor) -> bool:
        """Whether ``param`` still has the rows this state was made for (not resized through
        ``param.data`` since its last compile)."""
        return self.weight_matrix(param).shape[0] == self.spec.rows

    def mask_n(self, step: int | None = None) -> int:
        """N of the masks at ``step`` (default: now): the structure-decay schedule, else ``n``."""
        config = self.spec.config
        step = self.step if step is None else step
        return reference.effective_n(config, step) if config.structure_decay else config.n

    def alpha(self, step: int | None = None) -> float | None:
        """Mask-decay factor at ``step`` (default: now), ``None`` without mask decay."""
        config = self.spec.config
        if config.mask_decay == "none":
            return None
        return reference.decay_alpha(config, self.step if step is None else step)

    def graph_inputs(self, forward: Forward | None = None, compiled_index: int | None = None) -> list[torch.Tensor]:
        """The state tensors of ``forward`` (default: a use now) for the compiled graph, in
        ``spec.graph_inputs`` order; ``compiled_index``: the layer index the graph was compiled for,
        where dynamo reuses it for this layer (``step_tensor``)."""
        forward = forward if forward is not None else Forward("use", self.step, self.perm)
        values = {
            "perm": lambda: forward.perm,
            "n_eff": lambda: torch.tensor(self.mask_n(forward.step), dtype=torch.int64),
            "alpha": lambda: self.alpha_tensor(forward.step),
            "step": lambda: self.step_tensor(forward.step, compiled_index),
        }
        return [values[kind]() for kind in self.spec.graph_inputs]

    def alpha_tensor(self, step: int) -> torch.Tensor:
        """The mask-decay factor at ``step`` as a new 0-d tensor (``alpha_dtype``) on the weight's
        device. On CUDA it comes from pinned memory without blocking: a copy from pageable memory waits
        for the stream, which would hold every step of a mask-decay run until the GPU finished the step
        before it."""
        value = torch.tensor(self.alpha(step), dtype=alpha_dtype(self.spec.dtype))
        if self.device.type == "cuda":
            return value.pin_memory().to(self.device, non_blocking=True)
        return value.to(self.device)

    def step_tensor(self, step: int, compiled_index: int | None = None) -> torch.Tensor:
        """``step`` as a new 0-d tensor (a graph input seeding MVUE): made per call, never mutated.
        A graph compiled for the layer of index ``compiled_index`` holds that layer's MVUE key (dynamo
        hands one graph to every block of a class); there the step is given as ``step ^ key ^ its
        key``, which the prune's ``(step mod 2³²) ^ key`` turns into this layer's stream (SPEC §7)."""
        if compiled_index is not None and compiled_index != self.spec.index:
            seed = self.spec.config.seed
            step ^= reference.prune_key(seed, self.spec.index) ^ reference.prune_key(seed, compiled_index)
        return torch.tensor(step, dtype=torch.int64)

    def is_training_forward(self, grad: bool | None = None) -> bool:
        """A training step is a forward with grad enabled, outside ``inference_mode`` (where even
        ``enable_grad()`` records nothing), while the owning module is in train mode; ``grad``: the
        grad mode a compiled graph sets around the layer (``None``: the current one)."""
        if not (torch.is_grad_enabled() if grad is None else grad) or torch.is_inference_mode_enabled():
            return False
        owner = self.owner()
        return owner.training if owner is not None else True

    def owner(self) -> nn.Module | None:
        """The module that holds the weight, if it is still alive (``None`` where unknown)."""
        return self._owner() if self._owner is not None else None

    def orphaned(self) -> bool:
        """Whether the module it was made for is gone (another module may hold the weight now)."""
        return self._owner is not None and self._owner() is None

    def set_owner(self, owner: nn.Module | None) -> None:
        """``owner`` holds the weight now: its train/eval mode decides what counts as a step
        (``None``: no module known to hold it)."""
        self._owner = weakref.ref(owner) if owner is not None else None

    def enter_forward(self, param: torch.Tensor, grad: bool | None = None) -> Forward:
        """Start a forward through this layer with weight ``param`` (``grad``: as for
        ``is_training_forward``): a training forward searches
        (``begin_training_step``); a training forward inside a backward, after a training forward
        outside one, is a non-reentrant checkpoint's recompute of that forward (a reentrant
        checkpoint's first forward runs without grad, so its recompute is the training step).
        A forward outside training, outside a backward, on the thread of the last training forward
        forgets that forward (an evaluation on another thread leaves the training's alone, as the
        grad mode and the backward are per thread)."""
        progress = self.progress
        progress.dense_forward = False
        if not self.is_training_forward(grad):
            last = progress.last_forward
            if last is not None and last.thread == threading.get_ident() and not in_backward():
                progress.last_forward = None
            return Forward("use", self.step, self.perm)
        if progress.last_forward is not None and in_backward():
            return dataclasses.replace(progress.last_forward, kind="recompute")
        self.begin_training_step(param)
        return Forward("train", self.step, self.perm)

    def exit_forward(self, forward: Forward) -> None:
        """Finish ``forward``: a training forward counts a step and is remembered for a recompute."""
        if forward.kind == "train":
            self.progress.last_forward = forward
            self.end_training_step()

    def begin_training_step(self, param: torch.Tensor) -> None:
        """Run the permutation search if this step is a search step (every ``perm_interval``, from 0)."""
        spec, config = self.spec, self.spec.config
        step = self.step
        if spec.backward != "bimask" or step % config.perm_interval or self.last_search_step == step:
            return
        if param.is_meta:  # a shape-only forward (meta init, FLOP counting): no values to rank
            return
        with torch.no_grad():
            n = self.mask_n(step)
            generator = candidate_generator(config.seed, spec.index, step)
            candidates = permutation_candidates(spec, generator)
            w = self.weight_matrix(param)
            fmask, search = None, reference.search_permutation
            plain = type(w) is torch.Tensor
            if w.is_cuda and config.kernels != "portable" and plain and w.dim() == 2 and power_of_two(config.m):
                from nmcompile import kernels

                if kernels.triton_installed():  # one launch each
                    fmask, search = kernels.nm_mask(w, n, config.m, 1), kernels.search_permutation
            if fmask is None:
                fmask = nm_forward_mask(w, n, config.m)
            self.perm, _ = search(fmask, self.perm, candidates, n, config.m)
            if config.perm_swaps:  # drawn after the candidates, from the same generator
                swaps = config.perm_swaps
                self.perm = reference.swap_rows(fmask, self.perm, n, config.m, swaps, generator, spec.groups)
        self.last_search_step = step

    def end_training_step(self) -> None:
        """Count one finished training forward."""
        self.step += 1
        self.progress.trained_by = self

    def summary(self, param: torch.Tensor) -> dict[str, Any]:
        """Read-only view: permutation, step, schedule, and the kept fraction of forward weights in
        the backward (SPEC §5 score / count(F), for the current weight and N)."""
        spec, config = self.spec, self.spec.config
        n = self.mask_n()
        with torch.no_grad():
            w = self.weight_matrix(param)
            kept_fraction = math.nan  # meta: no values to count
            if not w.is_meta:
                fmask = self.forward_mask(w)
                kept = fmask.sum().item()
                kept_fraction = 1.0
                if spec.backward == "bimask" and kept:
                    kept_fraction = reference.permutation_score(fmask, self.perm, n, config.m) / kept
        return {
            "perm": self.perm.detach().clone(),
            "step": self.step,
            "kept_fraction": kept_fraction,
            "n": config.n,
            "m": config.m,
            "n_effective": n,
            "alpha": self.alpha(),
            "backward": spec.backward,
            "grad_prune": config.grad_prune,
            "layer_index": spec.index,
            "last_search_step": self.last_search_step,
        }

    def forward_mask(self, w: torch.Tensor) -> torch.Tensor:
        """The forward mask ``F`` of ``w`` (``weight_matrix``) now: N:M along the reduction dim at
        the N in force, or the transposable mask."""
        n, m = self.mask_n(), self.spec.config.m
        if self.spec.backward == "transposable":
            return reference.transposable_mask(w, n, m)
        return nm_forward_mask(w, n, m)

    def forward_weight(self, param: torch.Tensor) -> torch.Tensor:
        """The weight this layer's forward uses now, a new tensor in ``param``'s layout: ``W ⊙ F``,
        with mask decay ``W ⊙ (F + (1−F)·α)`` (SPEC §8)."""
        with torch.no_grad():
            w = self.weight_matrix(param)
            used = reference.Recipe(alpha=self.alpha()).weight(w, self.forward_mask(w))
            return used.t().contiguous() if self.spec.layout == "in_out" else used

    def payload(self) -> dict[str, Any]:
        """What a checkpoint keeps: everything else follows from the weight and the step. The
        permutation is saved on the CPU, or on the meta device for a model there (shapes only, as
        its parameters in its ``state_dict``)."""
        last = -1 if self.last_search_step is None else self.last_search_step
        perm = self.perm.detach()
        return {"perm": (perm if perm.is_meta else perm.cpu()).clone(), "step": self.step, "last_search_step": last}

    def load_payload(self, payload: dict[str, Any]) -> None:
        """Restore from ``payload()``; a permutation of another size, or one that is not a permutation
        of the rows (within each group of a grouped convolution), is refused with a warning."""
        perm = payload["perm"]
        problem = _perm_problem(perm, self.spec.rows, self.spec.groups, self.device.type == "meta")
        if problem is not None:
            warnings.warn(
                f"nmsparse: checkpoint permutation for {self.spec.name} {problem}; keeping the current state",
                stacklevel=3,
            )
            return
        self.perm = perm.to(self.device).clone()
        self.step = int(payload["step"])
        last = int(payload["last_search_step"])
        self.last_search_step = None if last < 0 else last
        self.progress.last_forward = None


def _perm_problem(perm: Any, rows: int, groups: int, on_meta: bool) -> str | None:
    """What makes ``perm`` unfit as a layer's permutation of ``rows`` rows in ``groups`` groups
    (the kernels index rows with it), or ``None``. A layer on the meta device (``on_meta``) takes
    a meta permutation of its size, which has no values to check; a layer with values does not."""
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64:
        return f"is not an int64 tensor ({getattr(perm, 'dtype', type(perm).__name__)})"
    if perm.shape != (rows,):
        return f"has {perm.numel()} rows, the layer has {rows}"
    if perm.is_meta:
        return None if on_meta else "is a meta tensor (no values)"
    perm, rows_in_order = perm.cpu(), torch.arange(rows)
    if not torch.equal(perm.sort().values, rows_in_order):
        return f"is not a permutation of range({rows})"
    size = rows // groups
    if groups > 1 and not torch.equal(perm // size, rows_in_order // size):
        return f"moves rows between the {groups} groups"
    return None


_ANCHOR = "_nmsparse_anchor"


def anchor(weight: torch.Tensor) -> torch.Tensor:
    """What weak references to ``weight`` go to instead of ``weight``: a 0-element tensor in its
    ``__dict__``, which dies with it. ``torch.utils.swap_tensors`` (``load_state_dict`` and ``.to()``
    under ``torch.__future__.set_swap_module_params_on_conversion(True)``) refuses a tensor that has
    weak references; it moves the ``__dict__``, so the anchor leaves with the old tensor, and the new
    one in the layer's place takes the layer's state by its slot (``StateRegistry.slot_state``).
    It is stored with ``id(weight)``: a ``__dict__`` that came from another tensor (``copy.copy``,
    unpickling, the other side of a swap) gets an anchor of its own."""
    entry = weight.__dict__.get(_ANCHOR)
    if entry is None or entry[0] != id(weight):
        entry = weight.__dict__[_ANCHOR] = (id(weight), torch.empty(0))
    return entry[1]


class WeightKeyDictionary:
    """A dict keyed by weights, weakly, through their ``anchor``."""

    def __init__(self) -> None:
        self._data = WeakIdKeyDictionary()

    def get(self, weight: torch.Tensor, default: Any = None) -> Any:
        """The value kept for ``weight`` (or for another view of its storage), else ``default``."""
        return self._data.get(anchor(weight), default)

    def setdefault(self, weight: torch.Tensor, default: Any) -> Any:
        """The value kept for ``weight``, after keeping ``default`` for it where there was none."""
        return self._data.setdefault(anchor(weight), default)

    def __getitem__(self, weight: torch.Tensor) -> Any:
        return self._data[anchor(weight)]

    def __setitem__(self, weight: torch.Tensor, value: Any) -> None:
        self._data[anchor(weight)] = value

    def __delitem__(self, weight: torch.Tensor) -> None:
        del self._data[anchor(weight)]

    def __len__(self) -> int:
        return len(self._data)


class StateRegistry:
    """Maps weight parameters (weakly, by identity, through ``anchor``) to their ``LayerState``: one per compile spec
    (each compile's own name, layer index and options), all sharing the weight's ``Progress``.

    A ``persistent`` registry (the default one) also makes states travel with the owning module's
    ``state_dict()`` and come back from ``load_state_dict()``; a private one (``explain``) does not.
    """

    def __init__(self, persistent: bool = False) -> None:
        self.persistent = persistent
        self._states = WeightKeyDictionary()  # weight -> its newest state
        self._views = WeightKeyDictionary()  # weight -> {spec: state}
        # These three by owning module and parameter name, the slot a state belongs to: it outlives
        # the Parameter object there (assign=True loads) and is shared by FSDP2's sharded and
        # unsharded Parameters.
        self._slots: WeakIdKeyDictionary = WeakIdKeyDictionary()  # owner -> {parameter name: state}
        self._pending: WeakIdKeyDictionary = WeakIdKeyDictionary()  # owner -> {parameter name: payload}
        self._without_state: WeakIdKeyDictionary = WeakIdKeyDictionary()  # owner -> {names an old checkpoint loaded}
        self._hooked: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._restarted: list[str] = []  # layers that restarted from such a checkpoint, for warn_restarted
        self._loaded_apart: WeakIdKeyDictionary = WeakIdKeyDictionary()  # owner -> {name: payload restored apart}
        self._lookup_tables = WeightKeyDictionary()  # weights a compiled graph read as embedding tables
        self._moved_to = WeightKeyDictionary()  # a Parameter moved to another slot: (module, name) that took its state
        self.lookup_generation = 0  # counts the tables noted: compiled graphs decide their ties again when it moves

    def get_or_create(self, weight: torch.Tensor, spec: LayerSpec, owner: nn.Module | None) -> LayerState:
        """The state of ``weight`` as ``spec`` uses it. Where ``weight`` has states for other specs
        (compiled with other options, or as part of another compiled module), the new one shares
        their progress; a weight of another shape starts afresh."""
        views = self._views.setdefault(weight, {})
        slot = spec.slot
        state = views.get(spec)
        if state is None and not views and owner is not None and self.slot_state(owner, slot, weight) is not None:
            state = views.get(spec)  # a new Parameter in a layer's place took over the layer's state
        if state is not None:
            if owner is not None and state.owner() is not owner:  # the module was swapped (reference.sparsify)
                state.set_owner(owner)
                self._slots.setdefault(owner, {})[slot] = state
                self._hook(owner)
            return state
        shared = next((v for v in views.values() if v.spec.rows == spec.rows), None)
        if shared is not None and owner is None:
            owner = shared.owner()
        state = LayerState(spec, weight.device, owner, shared.progress if shared is not None else None)
        self._serve(weight, state)
        current = self._slots.get(owner, {}).get(slot) if owner is not None else None
        holder = current.served() if current is not None else None
        if owner is not None and (holder is None or holder is anchor(weight)):  # not a stand-in for a live weight
            self._slots.setdefault(owner, {})[slot] = state
            payload = None if shared is not None else self._pending.get(owner, {}).pop(slot, None)
            if payload is not None:
                state.load_payload(payload)
            elif shared is None and slot in self._without_state.get(owner, ()):
                self._without_state[owner].discard(slot)
                self._restarted.append(spec.name)
        self._hook(owner)
        return state

    def get(self, weight: torch.Tensor) -> LayerState | None:
        """The state of ``weight`` that ran its last training step (the newest where none has), or
        ``None``, also where ``weight`` was resized since (its next compile starts a new state)."""
        state = self._states.get(weight)
        if state is None:
            return None
        trained = state.progress.trained_by
        state = trained if trained is not None else state
        return state if state.fits(weight) else None

    def discard(self, weight: torch.Tensor, state: LayerState) -> None:
        """Forget ``state``, one of ``weight``'s (the reference found the weight used twice in one
        forward: it stays dense and has no state, as in a compiled graph)."""
        views = self._views.get(weight, {})
        views.pop(state.spec, None)
        if self._states.get(weight) is state:
            newest = next(reversed(views.values()), None)
            if newest is None:
                del self._states[weight]
            else:
                self._states[weight] = newest
        if state.progress.trained_by is state:
            state.progress.trained_by = None
        slots = self._slots.get(state.owner(), {}) if state.owner() is not None else {}
        if slots.get(state.spec.slot) is state:
            del slots[state.spec.slot]

    def rehome(self, old: nn.Module, new: nn.Module) -> None:
        """Give ``new``, which takes ``old``'s place and parameters (``reference.sparsify`` swapping a
        layer), what the registry holds for ``old``'s slots: states, checkpoint payloads held since
        a load, old-checkpoint marks and the ``state_dict`` hook (whose dict ``new`` shares)."""
        for table in (self._slots, self._pending, self._without_state, self._hooked):
            if old in table:
                table[new] = table.pop(old)

    def hold(self, module: nn.Module, name: str, payload: dict[str, Any]) -> None:
        """Give the next new state of ``module``'s parameter ``name`` this checkpoint ``payload``
        (see ``LayerState.payload``); its ``state_dict()`` carries it until then."""
        self._pending.setdefault(module, {})[name] = payload
        self._hook(module)

    def checkpoint_entry(self, module: nn.Module, name: str, param: torch.Tensor) -> dict[str, Any] | None:
        """What a checkpoint saves for ``module``'s parameter ``name``: its state's payload (under
        FSDP2, the state of the unsharded Parameter in that slot), or the payload held for it."""
        if not isinstance(param, torch.distributed.tensor.DTensor):
            state = self.slot_state(module, name, param)
        elif (state := self._states.get(param)) is None:  # the sharded Parameter: the slot's state
            state = self._slots.get(module, {}).get(name)
        if state is not None:
            return state.payload() if state.fits(param) else None
        return self._pending.get(module, {}).get(name)

    def holds_payload(self, module: nn.Module, name: str) -> bool:
        """Whether a checkpoint's state for ``module``'s parameter ``name`` waits for its first compile."""
        return name in self._pending.get(module, {})

    def reparametrized_slots(self, module: nn.Module) -> list[str]:
        """The slots of ``module`` whose trained state its ``state_dict`` cannot carry: their
        Parameter lives on while the slot holds none (``torch.nn.utils.prune`` moved it to
        ``<name>_orig``, a parametrization to ``parametrizations.<name>.original``)."""
        return [
            slot
            for slot, state in self._slots.get(module, {}).items()
            if slot not in module._parameters and state.step and state.served() is not None
        ]

    def _hook(self, owner: nn.Module | None) -> None:
        """Make ``owner.state_dict()`` carry its layers' states (persistent registries, once per module)."""
        if self.persistent and owner is not None and owner not in self._hooked:
            self._hooked[owner] = owner.register_state_dict_post_hook(_StateDictHook(owner))

    def copy_states(self, original: nn.Module, copy: nn.Module) -> None:
        """Hold, for ``copy`` (a deep copy of ``original``, its hook copied with it), what
        ``original``'s checkpoint would save now."""
        for name, param in original.named_parameters(recurse=False):
            entry = self.checkpoint_entry(original, name, param)
            if entry is not None:
                self._pending.setdefault(copy, {})[name] = {**entry, "perm": entry["perm"].clone()}
        self._hooked[copy] = True

    def slot_state(self, module: nn.Module, name: str, param: torch.Tensor, loading: bool = False) -> LayerState | None:
        """``param``'s state; where a new Parameter has taken the place of ``module``'s parameter
        ``name`` with that slot's rows and device, the slot's state, which then follows the new
        Parameter (the compiled graphs look states up by the Parameters they are given), with a
        checkpoint payload held for the slot loaded into it.

        A load (``loading``: ``load_state_dict(assign=True)``) hands it over always; otherwise only
        where the Parameter it served is gone (``.to()`` under ``torch.__future__``'s overwrite or
        swap flag, ``layer.weight = nn.Parameter(...)``), not to one that stands in for it while it
        lives (``torch.func.functional_call``). A Parameter that took another slot's state (tied
        into two layers since) has none here; one that left the slot it trained in for this one
        (two layers' Parameters swapped, under one name or two) brings its state, to the first slot
        that asks where it went to two; not where a reparametrization holds it in place of a slot
        (``torch.nn.utils.prune``'s ``weight_orig``, a parametrization's ``original``)."""
        state = self._states.get(param)
        if state is not None:  # unless it is another slot's (a Parameter tied into a second layer since)
            owner, slot = state.owner(), state.spec.slot
            if owner is None or (owner is module and slot == name):
                return state
            if owner._parameters.get(slot) is param:  # still in its slot: tied into this one
                return None
            if _reparametrized(owner, slot, param) or _reparametrized(module, name, param):
                return None
            taken = self._moved_to.get(param)
            if taken is not None and taken[0]() is not None and taken[0]()._parameters.get(taken[1]) is param:
                return state if taken[0]() is module and taken[1] == name else None
            self._moved_to[param] = (weakref.ref(module), name)
            return state
        slot = self._slots.get(module, {}).get(name)
        if slot is None or not slot.fits(param) or slot.device != param.device:
            return None
        if not loading and slot.served() is not None:
            return None
        self._serve(param, slot)
        payload = self._pending.get(module, {}).pop(name, None)
        if payload is not None:
            slot.load_payload(payload)
        return slot

    def _serve(self, weight: torch.Tensor, state: LayerState) -> None:
        """Map ``weight`` to ``state`` and make it the weight ``state`` serves."""
        self._views.setdefault(weight, {})[state.spec] = state
        self._states[weight] = state
        state.holder = weakref.ref(anchor(weight))

    def restore_from(self, root: nn.Module, metadata: Any, loaded: Collection[str]) -> None:
        """After ``root.load_state_dict``: for each weight whose key is in ``loaded``, restore (or
        hold until compile) the layer state the checkpoint's ``_metadata`` carries. Where it carries
        none, a layer restarts, with a warning when it had trained; weights not loaded keep theirs."""
        metadata = {_unwrapped(prefix): entry for prefix, entry in (metadata or {}).items()}
        has_any = any(isinstance(entry, dict) and METADATA_KEY in entry for entry in metadata.values())
        missing = []
        for prefix, module in root.named_modules():
            entries = (metadata.get(_unwrapped(prefix)) or {}).get(METADATA_KEY, {})
            for name, param in module.named_parameters(recurse=False):
                if (f"{prefix}.{name}" if prefix else name) not in loaded:
                    continue
                state = self.slot_state(module, name, param, loading=True)
                if self._restored_apart(module, name, state):
                    continue
                if name in entries:
                    if state is not None:
                        state.load_payload(entries[name])
                    else:
                        self.hold(module, name, entries[name])
                elif state is not None:
                    if state.step:
                        missing.append(state.spec.name)
                    state.reset()
                else:  # an older checkpoint's state held for the slot goes: these weights have none
                    self._pending.get(module, {}).pop(name, None)
                    if not has_any:
                        self._without_state.setdefault(module, set()).add(name)
        if missing:
            _warn_without_state(missing, stacklevel=4)  # the caller of load_state_dict

    def restore_apart(self, root: nn.Module, payloads: dict[str, dict[str, Any]]) -> None:
        """``SparsityStates.load_state_dict``: restore (or hold until compile) each payload, keyed by
        ``root.named_parameters()`` names (matched without wrapper steps, ``_unwrapped``); a later
        ``load_state_dict`` of these weights keeps them until they train (``_restored_apart``)."""
        params = {_unwrapped(full): (module, name, param) for full, module, name, param in _named_slots(root)}
        payloads = {_unwrapped(full): payload for full, payload in payloads.items()}
        unknown = sorted(set(payloads) - set(params))
        if unknown:
            warnings.warn(f"nmsparse: sparsity states for {', '.join(unknown)}, which the model does not have, "
                          "are ignored", stacklevel=3)  # fmt: skip
        for full, payload in payloads.items():
            if full not in params:
                continue
            module, name, param = params[full]
            state = self.slot_state(module, name, param, loading=True)
            if state is None:
                self.hold(module, name, payload)
            else:
                state.load_payload(payload)
            self._loaded_apart.setdefault(module, {})[name] = payload

    def _restored_apart(self, module: nn.Module, name: str, state: LayerState | None) -> bool:
        """Whether ``restore_apart`` restored (or holds) the slot's state and it has not trained
        since: a ``load_state_dict`` of the same checkpoint (DCP loads the model after or before
        ``SparsityStates``, with ``_metadata`` from before the load or none) then keeps it. A state
        that has trained since loses the mark, so a later load wins even where it rolls the step
        back to the restored one."""
        marks = self._loaded_apart.get(module, {})
        mark = marks.get(name)
        if mark is None:
            return False
        if state is not None and state.step == int(mark["step"]):
            return True
        if state is None and self._pending.get(module, {}).get(name) is mark:
            return True
        del marks[name]
        return False

    def note_lookup_table(self, weight: torch.Tensor, name: str) -> None:
        """A compiled graph reads ``weight`` as an embedding table: a GEMM on it in another graph (an
        output head tied to the embedding across a graph break) is dense; one compiled earlier
        switches at its next call (``lookup_generation``), with a warning, its state dropped."""
        if self._lookup_tables.get(weight) is not None:
            return
        self._lookup_tables[weight] = True
        self.lookup_generation += 1
        if self._views.get(weight):
            warnings.warn(
                f"nmsparse: {name} is read by an embedding lookup here, and a graph compiled before ran it as a "
                "sparse GEMM weight (a tied output head): that GEMM runs dense from now on, its sparsity state "
                "dropped (its graph rewritten, eagerly, until torch._dynamo.reset() compiles it again)",
                stacklevel=3,
            )
            self.drop_states(weight)

    def drop_states(self, weight: torch.Tensor) -> None:
        """Forget every state of ``weight``, which every graph runs dense from now (a head found tied
        to an embedding after an earlier compile ran it sparse)."""
        for state in list(self._views.get(weight, {}).values()):
            self.discard(weight, state)

    def is_lookup_table(self, weight: torch.Tensor) -> bool:
        """Whether a compiled graph read ``weight`` as an embedding table."""
        return self._lookup_tables.get(weight) is not None

    def share_lookup_tables(self, other: StateRegistry) -> None:
        """Know the embedding tables ``other`` has seen (``explain``'s private registry)."""
        for key in other._lookup_tables._data.keys():  # anchors already
            self._lookup_tables._data[key] = True

    def warn_restarted(self) -> None:
        """One warning naming every layer whose new state restarted, since the last call, from a
        checkpoint loaded without sparsity state; the callers of ``get_or_create`` call it once
        they have made the states of a graph (or a model), so the warning names them all."""
        if self._restarted:
            names, self._restarted = self._restarted, []
            _warn_without_state(names, stacklevel=3)

    def __len__(self) -> int:
        return len(self._states)


def _warn_without_state(names: list[str], stacklevel: int) -> None:
    warnings.warn(
        f"nmsparse: the loaded checkpoint has no sparsity state for {', '.join(names)}; these layers start "
        "from the identity permutation at step 0 (a checkpoint from before nmcompile, or from a dense run: "
        "expected where sparse training starts from dense weights; to resume a sparse run, load the "
        "state_dict() it saved, which carries the states)",
        stacklevel=stacklevel,
    )


def _reparametrized(module: nn.Module, name: str, param: torch.Tensor) -> bool:
    """Whether ``module`` holds ``param`` in place of its slot ``name`` through a reparametrization, or
    ``name`` is such a holder: ``torch.nn.utils.prune``'s ``<name>_orig``, a parametrization's
    ``parametrizations.<name>.original*``."""
    if name.endswith("_orig") and torch.nn.utils.prune.is_pruned(module):
        return True
    if isinstance(module, torch.nn.utils.parametrize.ParametrizationList):
        return True
    if module._parameters.get(f"{name}_orig") is param:
        return True
    held = getattr(module, "parametrizations", None)
    return held is not None and name in held and any(p is param for p in held[name].parameters(recurse=False))


class _StateDictHook:
    """``state_dict`` post-hook of a module with sparse layers: puts their states (the default
    registry's) in the module's ``_metadata`` entry.

    It names no registry, so a model holding it still pickles (without the states: use
    ``state_dict()``); a ``copy.deepcopy`` of the model holds the states the original has at
    that moment for the copy, whose ``state_dict()`` and first compile then carry them.
    """

    def __init__(self, module: nn.Module | None = None) -> None:
        self._module = weakref.ref(module) if module is not None else None

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        entries = {}
        for name, param in module.named_parameters(recurse=False):
            entry = DEFAULT_REGISTRY.checkpoint_entry(module, name, param)
            if entry is not None:
                entries[name] = entry
        if entries:
            local_metadata[METADATA_KEY] = entries
        for slot in DEFAULT_REGISTRY.reparametrized_slots(module):
            warnings.warn(
                f"nmsparse: the sparsity state (step, permutation) of {prefix}{slot} is not in this state_dict: "
                f"its Parameter is no longer at {prefix}{slot} (torch.nn.utils.prune or a parametrization moved "
                "it), so a resume from it restarts that layer's schedules; remove the reparametrization "
                "(prune.remove, parametrize.remove_parametrizations) before checkpointing",
                stacklevel=3,
            )

    def __reduce__(self) -> tuple:
        return (_StateDictHook, ())

    def __deepcopy__(self, memo: dict) -> _StateDictHook:
        original = self._module() if self._module is not None else None
        copy = memo.get(id(original)) if original is not None else None
        if copy is None:
            return _StateDictHook()
        DEFAULT_REGISTRY.copy_states(original, copy)
        return _StateDictHook(copy)


DEFAULT_REGISTRY = StateRegistry(persistent=True)
_load_state_dict = nn.Module.load_state_dict


@functools.wraps(_load_state_dict)
def _load_state_dict_with_sparsity(self: nn.Module, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
    result = _load_state_dict(self, state_dict, strict=strict, assign=assign)
    # The weights it loaded: every slot but the missing ones, as torch counts them after the load
    # pre-hooks (a hook may rename the caller's keys, as consume_prefix_in_state_dict_if_present).
    loaded = {full for full, *_ in _named_slots(self)} - set(result.missing_keys)
    DEFAULT_REGISTRY.restore_from(self, getattr(state_dict, "_metadata", None), loaded)
    return result


# torch has no global load_state_dict hook, and torch.compile calls the backend only at the first
# forward, usually after the checkpoint was loaded: so the loader itself brings the states back.
nn.Module.load_state_dict = _load_state_dict_with_sparsity  # type: ignore[method-assign]


_WRAPPER_STEPS = ("_checkpoint_wrapped_module", "_orig_mod")


def _unwrapped(prefix: str) -> str:
    """A module's (or parameter's) name without the steps of torch's ``checkpoint_wrapper``, which
    strips them from state_dict keys but not from ``_metadata``, and of a compiled submodule
    (``_orig_mod``), as ``torch.distributed.checkpoint`` names weights: a checkpoint's states find
    their layers in a model with or without activation-checkpoint wrappers or compiled blocks."""
    return ".".join(part for part in prefix.split(".") if part not in _WRAPPER_STEPS)


def _named_slots(root: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """``(full name, owning module, name there, parameter)`` for every parameter slot of ``root``
    (a tied weight once per slot), as checkpoints key the states."""
    for prefix, module in root.named_modules():
        for name, param in module.named_parameters(recurse=False):
            yield (f"{prefix}.{name}" if prefix else name), module, name, param


class SparsityStates:
    """The layer states of ``model`` on their own, as a ``torch.distributed.checkpoint`` ``Stateful``:
    ``dcp.save({"model": model.state_dict(), "nmsparse": SparsityStates(model)}, ...)`` and the
    same dict to ``dcp.load``. DCP drops the ``_metadata`` that ``model.state_dict()`` carries them in.

    ``state_dict()`` is one entry of bytes (``torch.save`` of every payload): DCP loads only the keys
    the loading side already holds, and a fresh model has no states before its first compile.
    """

    def __init__(self, model: nn.Module) -> None:
        self.module = unwrap(model)

    def state_dict(self) -> dict[str, bytes]:
        """``{"states": bytes}``: each sparsified weight's payload by its ``named_parameters()`` name
        without wrapper steps (``_unwrapped``), as DCP names the weights."""
        payloads: dict[str, dict[str, Any]] = {}
        for full, module, name, param in _named_slots(self.module):
            entry = DEFAULT_REGISTRY.checkpoint_entry(module, name, param)
            if entry is not None:
                payloads[_unwrapped(full)] = entry
        buffer = io.BytesIO()
        torch.save(payloads, buffer)
        return {"states": buffer.getvalue()}

    def load_state_dict(self, state_dict: dict[str, bytes]) -> None:
        """Restore the states ``state_dict()`` wrote, or hold them until the layers compile."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("states"), bytes):
            raise TypeError(
                "nmsparse: SparsityStates.load_state_dict takes what SparsityStates.state_dict() returns "
                f"({{'states': bytes}}), got {type(state_dict).__name__}"
            )
        try:
            payloads = torch.load(io.BytesIO(state_dict["states"]), weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise _not_states(f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(payloads, dict):
            raise _not_states(f"a {type(payloads).__name__}")
        for name, payload in payloads.items():  # all checked before any is restored: none or all load
            problem = _payload_problem(payload)
            if not isinstance(name, str) or problem is not None:
                raise _not_states(f"{name!r}: {problem or 'a key that is not a parameter name'}")
        DEFAULT_REGISTRY.restore_apart(self.module, payloads)


def _payload_problem(payload: Any) -> str | None:
    """What keeps ``payload`` from being one ``LayerState.payload()`` wrote, or ``None``; the
    permutation's size and values are ``load_payload``'s to judge (a model may have changed)."""
    if not isinstance(payload, dict):
        return f"a {type(payload).__name__}, not a layer's state"
    missing = sorted({"perm", "step", "last_search_step"} - set(payload))
    if missing:
        return f"a layer's state without {', '.join(missing)}"
    if not isinstance(payload["perm"], torch.Tensor):
        return f"a permutation that is a {type(payload['perm']).__name__}"
    for key, least in (("step", 0), ("last_search_step", -1)):
        value = payload[key]
        if type(value) is not int or value < least:
            return f"{key} {value!r}, not an int of at least {least}"
    return None


def _not_states(found: str) -> ValueError:
    """The error for ``SparsityStates`` bytes that are not what its ``state_dict()`` wrote."""
    return ValueError(
        "nmsparse: SparsityStates.load_state_dict: the 'states' bytes are not what "
        f"SparsityStates.state_dict() writes (a torch.save of a dict); found {found:.200}"
    )


def unsharded_parameters(root: nn.Module) -> dict[int, torch.Tensor]:
    """FSDP2 (``fully_shard``): ``id(sharded parameter) -> unsharded parameter``, the one the
    compiled GEMMs see and the layer state is keyed by. Empty without FSDP2."""
    out: dict[int, torch.Tensor] = {}
    for module in root.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        group = getattr(get_state(), "_fsdp_param_group", None) if get_state is not None else None
        for fsdp_param in getattr(group, "fsdp_params", ()):
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            if unsharded is not None:
                out[id(fsdp_param.sharded_param)] = unsharded
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind a ``torch.compile`` wrapper (``OptimizedModule``); a ``TypeError``
    for anything else (a compiled function: pass the modules it uses)."""
    module = getattr(model, "_orig_mod", model)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"nmsparse: expected an nn.Module or its torch.compile wrapper, got {type(module).__name__}; "
            "for a compiled function, pass the module whose weights it uses (or set NMSPARSE_DUMP_DIR "
            "for the reports of its compiles)"
        )
    return module


def sparsity_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per sparsified weight (named as ``model.named_parameters()`` spells it): perm, step,
    kept_fraction, effective N and decay factor. Under FSDP2 it gathers each sharded weight
    (``full_tensor``), a collective: call it on every rank."""
    return {name: state.summary(param) for name, param, state in _sparsified(model)}


def forward_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per sparsified weight (named as ``sparsity_state`` names it): the weight its forward uses now,
    ``W ⊙ F`` (``W ⊙ (F + (1−F)·α)`` while a mask decays), as a new tensor of the parameter's shape.
    ``state_dict()`` keeps the dense parameters, from which the masks are chosen each step; loading
    these over them gives a plain model the compiled model's eval forward, to deploy or export.
    A frozen weight (``requires_grad=False``) runs dense (SPEC §10), so it is left out, state or not;
    so is a weight whose last forward ran in a graph that leaves it dense (a later compile's options:
    ``exclude``, an ``m`` that does not divide it), which keeps its state for a sparse compile.
    Under FSDP2 it gathers each sharded weight (a collective: call it on every rank)."""
    weights = {
        name: state.forward_weight(param)
        for name, param, state in _sparsified(model)
        if param.requires_grad and not state.progress.dense_forward
    }
    waiting = [
        full
        for full, module, name, param in _named_slots(unwrap(model))
        if full not in weights and param.requires_grad and DEFAULT_REGISTRY.holds_payload(module, name)
    ]
    if waiting:
        warnings.warn(
            f"nmsparse: forward_weights leaves out {', '.join(waiting)}: their sparsity states, loaded from a "
            "checkpoint or carried by a copy of the model, wait for the model's first compiled forward, whose "
            "options say their N:M; run one (under torch.no_grad(), which trains nothing) first",
            stacklevel=2,
        )
    return weights


def _sparsified(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, LayerState]]:
    """``model``'s sparsified weights: name, full (FSDP2-gathered) parameter and the state in force."""
    registry = DEFAULT_REGISTRY
    module = unwrap(model)
    unsharded = unsharded_parameters(module)
    owners = {id(p): (owner, slot) for owner in module.modules() for slot, p in owner.named_parameters(recurse=False)}
    for name, param in module.named_parameters():
        key = unsharded.get(id(param), param)
        state = registry.get(key)
        if state is None and key is param and registry.slot_state(*owners[id(param)], param) is not None:
            state = registry.get(key)  # a new Parameter in a layer's place, not yet run
        if state is not None:
            full = param.full_tensor() if isinstance(param, torch.distributed.tensor.DTensor) else param
            yield name, full, state
