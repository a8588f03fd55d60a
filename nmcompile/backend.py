"""The ``nmsparse`` torch.compile backend: analyse, rewrite, compile, and run with layer state.

Pipeline per dynamo graph (README, "Layout"): resolve which placeholders are parameters and their
names, ``find_targets``, ``insert_masks``, ``lower_kernels``, then AOTAutograd + the inner compiler (Inductor or
eager), with ``name_nodes`` on the forward and backward graphs. The returned callable passes the
layer state tensors after the user's inputs and counts training steps (SPEC §5, §8).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import re
import sys
import types
import warnings
import weakref
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from nmcompile import ops
from nmcompile.inspection import CompileRecord, dump_dir, global_backward_hook
from nmcompile.options import SparsityConfig, SparsityConfigError
from nmcompile.passes import (
    GRAPH_FUNCTIONS,
    GemmTarget,
    KernelChoice,
    ParamInfo,
    decompose_attention,
    find_targets,
    inline_subgraphs,
    insert_masks,
    lift_parameters,
    lookup_tables,
    lower_kernels,
    name_nodes,
    outline_regions,
)
from nmcompile.passes.utils import copy_graph_module, example_value, grad_modes, identifier
from nmcompile.state import (
    DEFAULT_REGISTRY,
    LayerSpec,
    LayerState,
    StateRegistry,
    WeightKeyDictionary,
    anchor,
    in_backward,
    unsharded_parameters,
)

_SOURCE_ROOT = re.compile(r"^([LG])\['([^']+)'\]")
_SOURCE_STEP = re.compile(r"\.([A-Za-z_]\w*)|\[(-?\d+)\]|\['([^']*)'\]")


_Entry = tuple[str, int, nn.Module, tuple[str, ...]]  # name, index in named_parameters(), owner, other names
_Table = dict[int, _Entry]  # id(param) -> its entry


def _parameter_table(root: nn.Module) -> _Table:
    """``id(param) -> (name, index in named_parameters(), owning module, other names)`` for a root
    module, the other names being those of modules that share the parameter (tied weights); under
    FSDP2 the unsharded parameter the graph sees maps to its sharded parameter's entry."""
    table: _Table = {}
    for mod_name, module in root.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            name = f"{mod_name}.{pname}" if mod_name else pname
            if id(param) not in table:
                table[id(param)] = (name, len(table), module, ())
            else:
                first, index, owner, others = table[id(param)]
                table[id(param)] = (first, index, owner, (*others, name))
    for sharded, unsharded in unsharded_parameters(root).items():
        entry = table.get(sharded)
        if entry is not None:
            table.setdefault(id(unsharded), entry)
    return table


_MODULE_CALLS = (nn.Module._wrapped_call_impl.__code__, nn.Module._call_impl.__code__)


def _compiled_roots(backend: Any = None) -> list[nn.Module]:
    """Modules compiled by ``torch.compile`` (wrapped) or ``module.compile()`` (in place) that are
    being called on this thread's stack, innermost first; those ``backend`` compiled only, where it
    compiled any (the backend compiling, or that compiled the graph running; equal as dynamo
    compares them, ``torch.compile``'s wrapper by backend and options): another compile
    around blocks compiled alone (another backend's, or nmsparse's with other options) that runs
    them as frames of their own (from a ``torch.compiler.disable``d method, after a graph break in
    them, or after it fell back to eager) does not name their weights.

    Only ``nn.Module`` call frames are looked into: reading ``f_locals`` of any other frame (the
    user's training loop) would pin its locals in a snapshot for as long as that frame lives.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    roots: list[tuple[nn.Module, Any]] = []
    frame = sys._getframe()
    while frame is not None:
        if any(frame.f_code is code for code in _MODULE_CALLS):  # identity: dynamo's resume code is unhashable
            owner = frame.f_locals.get("self")
            if isinstance(owner, OptimizedModule) or getattr(owner, "_compiled_call_impl", None) is not None:
                module = owner._orig_mod if isinstance(owner, OptimizedModule) else owner
                if all(module is not r for r, _ in roots):
                    roots.append((module, _compile_backend(owner)))
        frame = frame.f_back
    mine = [module for module, compiled_by in roots if backend is not None and compiled_by == backend]
    return mine or [module for module, _ in roots]


_EMPTY_CELL = types.CellType()


def _compile_backend(module: nn.Module) -> Any:
    """The backend a compiled module was compiled with, unwrapped as ``_compiling_backend`` unwraps
    dynamo's (``None`` where not found: another torch)."""
    from torch._dynamo.eval_frame import OptimizedModule, _TorchDynamoContext, innermost_backend

    if isinstance(module, OptimizedModule):
        context = module.dynamo_ctx
    else:  # compiled in place: torch.compile's wrapper of its _call_impl holds the context
        cells = getattr(module._compiled_call_impl, "__closure__", None) or ()
        contents = [cell.cell_contents for cell in cells if cell != _EMPTY_CELL]  # reading an empty one raises
        context = next((c for c in contents if isinstance(c, _TorchDynamoContext)), None)
    callback = getattr(context, "callback", None)
    return innermost_backend(callback) if callback is not None else None


def _compiling_backend() -> Any:
    """The backend dynamo is compiling with, unwrapped, also from DDP's graph splitting, which
    compiles every frame while a DDP module runs (``None`` outside dynamo's tracing)."""
    from torch._dynamo.eval_frame import innermost_backend

    tx = _compiling_frame()
    if tx is None or not tx.output.compiler_fn:
        return None
    compiler = tx.output.compiler_fn
    compiler = getattr(getattr(compiler, "__self__", None), "backend_compile_fn", compiler)  # DDPOptimizer.compile_fn
    return innermost_backend(compiler)


def _modules_in_compiled_code(backend: Any) -> list[nn.Module]:
    """The modules being called on this thread's stack inside the innermost call of a function
    that ``torch.compile`` compiled (its wrapper's frame), and that function's module where it is
    a bound method (``torch.compile(model.forward)``), outermost first; ``[]`` where that call is
    not ``backend``'s or there is none. Where a compiled function ``step(model, x)`` runs the
    model's blocks as frames of their own (after a graph break in them), their weights are so named
    within the model, as without the break, not within the block that dynamo compiles."""
    from torch._dynamo.eval_frame import OptimizedModule, innermost_backend

    wrapper_file = os.path.join("_dynamo", "eval_frame.py")
    called: list[nn.Module] = []
    frame = sys._getframe()
    while frame is not None:
        code = frame.f_code
        if any(code is call for call in _MODULE_CALLS):
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module):
                called.append(owner._orig_mod if isinstance(owner, OptimizedModule) else owner)
        elif code.co_filename.endswith(wrapper_file) and "callback" in frame.f_locals:  # not a disable's wrapper
            callback, fn = frame.f_locals["callback"], frame.f_locals.get("fn")
            if backend is None or callback is None or innermost_backend(callback) != backend:
                return []
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, nn.Module):
                called.append(owner)
            return list(dict.fromkeys(reversed(called)))
        frame = frame.f_back
    return []


def _root_tables(backend: Any = None) -> list[_Table]:
    """``_parameter_table`` of each compiled module being called (``_compiled_roots``), outermost
    first (full names)."""
    return [_parameter_table(root) for root in reversed(_compiled_roots(backend))]


def _lookup(tables: list[_Table], param: torch.Tensor) -> _Entry | None:
    """``param``'s entry in the first of ``tables`` that holds it, or ``None``."""
    return next((t[id(param)] for t in tables if id(param) in t), None)


_Namespaces = tuple[Mapping[str, Any], Mapping[str, Any]]  # a frame's locals and globals
_CodeKey = tuple[str, str, int]  # a code object's name, file and first line


class _CallTables:
    """``_root_tables()`` for one compile or one call of a compiled graph: built at its first
    lookup, then shared by the rest (each build walks every parameter of the model, so a build per
    weight made the first call of a graph reused by many blocks quadratic in the blocks).

    Where no compiled module on the stack holds a parameter, ``lookup`` looks in the modules called
    inside compiled code (``_modules_in_compiled_code``), then follows its dynamo source through
    ``namespaces`` (the compiled frame's locals and globals, asked for at the first such lookup): a
    compiled function given the model, ``fn(model, x)``, finds each model's modules."""

    def __init__(self, namespaces: Callable[[], _Namespaces | None] | None = None, backend: Any = None) -> None:
        self._tables: list[_Table] | None = None
        self._namespaces = namespaces
        self._backend = backend
        self._frame: _Namespaces | None = None
        self._chain_tables: dict[int, _Table] = {}  # one table per module met on a source chain
        self._called: list[_Table] | None = None  # the modules called inside the compiled code

    def tables(self) -> list[_Table]:
        if self._tables is None:
            self._tables = _root_tables(self._backend)
        return self._tables

    def known(self) -> list[_Table]:
        """Every table built so far: the compiled modules', the modules called inside compiled code
        and the outermost modules on the source chains looked up (a compiled function's model)."""
        return [*self.tables(), *(self._called or []), *self._chain_tables.values()]

    def lookup(self, param: torch.Tensor, source: str | None = None) -> _Entry | None:
        """``param``'s entry in the compiled modules being called, else in the modules called inside
        compiled code, else in the outermost module on its ``source`` chain that holds it."""
        found = _lookup(self.tables(), param)
        if found is None and self._namespaces is not None:
            if self._called is None:
                self._called = [_parameter_table(module) for module in _modules_in_compiled_code(self._backend)]
            found = _lookup(self._called, param)
        if found is not None or source is None or self._namespaces is None:
            return found
        if self._frame is None:
            self._frame = self._namespaces() or ({}, {})
        modules = _source_modules(source, self._frame)
        for module in modules:
            if id(module) not in self._chain_tables:
                self._chain_tables[id(module)] = _parameter_table(module)
        return _lookup([self._chain_tables[id(m)] for m in modules], param)


def _compiling_frame() -> Any:
    """Dynamo's tracer of the frame it is compiling (the outermost, whose locals its sources
    read), or ``None`` outside its tracing (a graph compiled by hand)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    try:
        return InstructionTranslator.current_tx()
    except AttributeError:
        return None


def _compiling_namespaces() -> _Namespaces | None:
    """The locals and globals of the frame dynamo is compiling, which its sources are read in."""
    tx = _compiling_frame()
    return (tx.f_locals, tx.f_globals) if tx is not None else None


def _code_key(code: Any) -> _CodeKey:
    """What a frame that runs ``code`` shows of it: dynamo runs its own code object in that frame,
    with the name, file and first line of the code it compiled."""
    return code.co_name, code.co_filename, code.co_firstlineno


def _running_namespaces(code: _CodeKey) -> _Namespaces | None:
    """The locals and globals of the innermost frame on this thread's stack that runs ``code``: a
    compiled function's, called now (its locals are read once, while it runs), or ``None``."""
    frame = sys._getframe(1)
    while frame is not None:
        if _code_key(frame.f_code) == code:
            return frame.f_locals, frame.f_globals
        frame = frame.f_back
    return None


def _source_modules(source_name: str, namespaces: _Namespaces) -> list[nn.Module]:
    """The modules met along a dynamo source chain such as
    ``L['self'].model._modules['fc1']._parameters['weight']``, outermost first, each compiled
    wrapper standing for the module it wraps.

    The chain is evaluated against ``namespaces``, the locals and globals of the frame dynamo
    compiled, one attribute or item at a time, as dynamo's own guards read it; it stops where a
    step cannot be parsed or read.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    match = _SOURCE_ROOT.match(source_name)
    if match is None:
        return []
    try:
        obj = namespaces[0 if match[1] == "L" else 1][match[2]]
    except Exception:
        return []
    modules: list[nn.Module] = []
    pos = match.end()
    while True:
        if isinstance(obj, nn.Module):
            module = obj._orig_mod if isinstance(obj, OptimizedModule) else obj
            if all(module is not m for m in modules):
                modules.append(module)
        step = _SOURCE_STEP.match(source_name, pos)
        if step is None:
            return modules
        attr, index, key = step.groups()
        try:
            obj = getattr(obj, attr) if attr is not None else obj[int(index) if index is not None else key]
        except Exception:
            return modules
        pos = step.end()


def _real(placeholder: fx.Node, value: Any) -> Any:
    """The real input behind a placeholder: DDP's graph splitting compiles each bucket with fake
    example inputs, but dynamo's ``grapharg`` still holds the real tensor (e.g. the Parameter)."""
    grapharg = placeholder.meta.get("grapharg")
    if isinstance(value, torch._subclasses.FakeTensor) and grapharg is not None:
        return grapharg.example
    return value


def resolve_parameters(
    gm: fx.GraphModule, example_inputs: Sequence[Any], roots: _CallTables | None = None
) -> dict[str, ParamInfo]:
    """Placeholder name -> ``ParamInfo`` for every placeholder whose example input is a Parameter.

    Names are as ``model.named_parameters()`` spells them for the outermost compiled module on the
    stack (so graph breaks inside submodules keep full names); otherwise relative to the outermost
    module on the dynamo source's chain (a compiled function reaching ``self.model``, a compiled
    wrapper called inside another compiled function); otherwise the source text itself.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    pairs = [(ph, _real(ph, v)) for ph, v in zip(placeholders, example_inputs, strict=False)]
    pairs = [(ph, v) for ph, v in pairs if isinstance(v, nn.Parameter)]
    if not pairs:
        return {}
    roots = roots or _CallTables(_compiling_namespaces, _compiling_backend())
    out: dict[str, ParamInfo] = {}
    for placeholder, param in pairs:
        source = _source(placeholder)
        found = roots.lookup(param, source)
        if found is None:
            found = (source, zlib.crc32(source.encode()), None, ())
        out[placeholder.name] = ParamInfo(found[0], found[1], param, found[2], found[3])
    return out


def _source(placeholder: fx.Node) -> str:
    """The dynamo source a graph input was read from (``L['model']._modules['fc1']...``), else its name."""
    grapharg = placeholder.meta.get("grapharg")
    source = grapharg.source if grapharg is not None else getattr(placeholder, "_dynamo_source", None)
    return source.name if source is not None else placeholder.name


def _readable_input(placeholder: str, params: dict[str, ParamInfo], numbered: dict[str, str]) -> str:
    """``fc1_weight`` for the placeholder of ``fc1.weight``, and with a layer's numbered node-name
    prefix (``numbered``: layer name, as ``a_b.c``, to ``a_b_c_2``) ``a_b_c_2_weight`` and
    ``a_b_c_2_bias``, as its other nodes are named; other inputs keep their name."""
    info = params.get(placeholder)
    if info is None:
        return placeholder
    owner, _, leaf = info.name.rpartition(".")
    if info.name in numbered:  # a bare Parameter taken as a GEMM's weight names its layer
        return numbered[info.name]
    return f"{numbered[owner]}_{identifier(leaf)}" if owner in numbered else identifier(info.name)


def _propagate_fake_values(gm: fx.GraphModule) -> None:
    """Example values for nodes a pre-pass created, so that the report knows their shapes and which
    need a gradient: ``FakeTensorProp``'s ``val`` is detached, so the value itself goes into
    ``example_value`` too, as dynamo records its own nodes' (run in the grad mode of the trace)."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    class Prop(FakeTensorProp):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            n.meta.setdefault("example_value", result)
            return result

    inputs = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = next(t.fake_mode for t in inputs if isinstance(t, torch._subclasses.FakeTensor))
    Prop(gm, mode=mode).propagate_dont_convert_inputs(*inputs)


def _before_inner_compile(record: CompileRecord | None, kind: str, gm: fx.GraphModule) -> None:
    """What each graph AOTAutograd hands the inner compiler gets first, on either path: readable
    node names, its copy in ``record``, and for a forward, a backward that donates no buffer."""
    if kind == "forward":
        _donate_no_buffers()
    before = [node.name for node in gm.graph.nodes]
    name_nodes(gm)
    if record is not None:
        record.add_graph(kind, gm, dict(zip(before, (node.name for node in gm.graph.nodes), strict=True)))


def _decompositions() -> dict:
    """The composite mask op's own decomposition (AOTAutograd keeps ops of other namespaces whole,
    and an unfused ``nm_mask`` runs eagerly as a dozen full-size temporaries), the portable
    GEMM's forward where the C mask kernels run (``ops.inline_linear_forward``), and each other
    sparse GEMM op's ``nograd`` overload (``ops.NO_GRAD_OVERLOADS``, the lowered ones once registered)."""
    return {
        torch.ops.nmsparse.nm_mask.default: ops.nm_mask,
        torch.ops.nmsparse.cpu_linear.default: ops.inline_linear_forward,
        **ops.NO_GRAD_OVERLOADS,
    }


def _register_inductor_decomposition() -> None:
    """Put ``_decompositions`` into Inductor's own table (once). Handing the table to ``compile_fx``
    instead makes it part of the FX graph cache key, which cannot pickle it: no graph was cached."""
    from torch._inductor import decomposition

    table = _decompositions()
    if not table.keys() <= decomposition.decompositions.keys():
        decomposition.decompositions.update(table)
        decomposition.fast_random_decomps.cache_clear()


def _mode_patches(mode: str | None, config: SparsityConfig) -> dict[str, Any]:
    """The Inductor settings of ``torch.compile``'s ``mode``, for the inner Inductor compile;
    ``SparsityConfigError`` for an unknown mode, or any but the default with ``inner="aot_eager"``."""
    if mode is None or mode == "default":
        return {}
    from torch._inductor import list_mode_options

    modes = list_mode_options()
    if mode not in modes:
        raise SparsityConfigError(f"torch.compile mode={mode!r} is invalid for nmsparse: allowed {sorted(modes)}")
    if config.inner != "inductor":
        raise SparsityConfigError(
            f"torch.compile mode={mode!r} sets up the inner Inductor compile; with inner={config.inner!r} "
            "leave mode out"
        )
    return modes[mode]


MVUE_OPCOUNT_THRESHOLD = 30
"""Inductor's ``realize_opcount_threshold`` for graphs with MVUE pruning: the most ops a pointwise
value used more than once may inline before it is written out. On the CPU the MVUE rule is inlined as
aten ops (``ops._prune_tokens``), and Inductor's CPU default (50) let its values inline into every use:
a 3-layer MLP's first step compiled in 51 s, 12 s without MVUE (and 413 s at 64). At 30, Inductor's
GPU default, it compiles in 19 s and the FFN benchmark's MVUE step runs in 79 ms, not 97
(python -m benchmarks.step --device cpu, 2-core AMD EPYC, torch 2.13.0+cpu, docs/benchmarks.md)."""


def _fusion_patches(config: SparsityConfig) -> dict[str, Any]:
    """Inductor settings for graphs with MVUE pruning (``MVUE_OPCOUNT_THRESHOLD``), unless the user
    set the threshold (or this torch has no such setting)."""
    from torch._inductor import config as inductor_config

    if config.grad_prune == "none" or getattr(inductor_config, "realize_opcount_threshold", 0) is not None:
        return {}
    return {"realize_opcount_threshold": MVUE_OPCOUNT_THRESHOLD}


def _donate_no_buffers() -> None:
    """Let the backward being compiled donate none of the tensors the forward saves, so that
    ``backward(retain_graph=True)`` runs, at any call. A donating backward refuses it; AOTAutograd
    gives up donation only where the first backward retains the graph and compiles lazily then,
    which ours does not (``_compile_inner``). Called while the forward compiles: the donated
    indices are the compile's ``fw_metadata``, in the tracing context, which Inductor's backward
    compile and the runtime check both read. (``torch._functorch.config.donated_buffer=False``
    leaves them unset, which that check takes for donation.) A no-op where torch lacks them."""
    context = torch._guards.TracingContext.try_get()
    metadata = getattr(context, "fw_metadata", None)
    if metadata is not None and hasattr(metadata, "bw_donated_idxs"):
        metadata.bw_donated_idxs = []


def _compile_inner(
    gm: fx.GraphModule, inputs: list, config: SparsityConfig, record: CompileRecord | None, patches: dict[str, Any]
) -> Callable:
    """AOTAutograd + ``config.inner`` on the rewritten graph, naming nodes of each produced graph;
    ``patches``: Inductor settings (``torch.compile``'s ``mode``, ``_fusion_patches``).

    Where Inductor cannot compile the graph (its own error, as on some dynamic-shape convolution
    backwards of torch 2.13), the graph runs through AOTAutograd alone, as ``inner="aot_eager"``
    would, with a warning: still sparse, only not fused (dynamo's requests to restart its analysis
    pass through: they are no failure). The backward is compiled with the forward
    (not at the first backward, AOTAutograd's default), so that its failure is caught here too.
    Its backward donates no buffer (``_donate_no_buffers``)."""
    if config.inner == "inductor":
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner_compile(graph: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
            kind = "inference" if kwargs.get("is_inference") else "forward"
            kind = "backward" if kwargs.get("is_backward") else kind
            _before_inner_compile(record, kind, graph)
            return compile_fx_inner(graph, example_inputs, **kwargs)

        _register_inductor_decomposition()
        try:
            with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                return compile_fx(copy_graph_module(gm)[0], inputs, inner_compile=inner_compile,
                                  config_patches=patches or None)  # fmt: skip
        except torch._dynamo.exc.RestartAnalysis:  # dynamo's request to trace again (a float made an input)
            raise
        except Exception as exc:  # a warning instead of a crash: the same graph without Inductor
            warnings.warn(
                f"nmsparse: Inductor could not compile a graph ({type(exc).__name__}: {_cause(exc)}); it runs "
                "through AOTAutograd without Inductor (as inner='aot_eager'): still sparse, not fused",
                stacklevel=2,
            )

    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    def eager(kind: str, graph: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        _before_inner_compile(record, kind, graph)
        return boxed_nop(graph, list(example_inputs))

    return aot_autograd(
        decompositions=_decompositions(),
        fw_compiler=functools.partial(eager, "forward"),
        bw_compiler=functools.partial(eager, "backward"),
        inference_compiler=functools.partial(eager, "inference"),
        keep_inference_input_mutations=True,  # as dense aot_eager: a recomputed region reads buffers as they were
    )(gm, inputs)


def _cause(exc: BaseException) -> str:
    """The line of ``exc``'s message that names its cause: the last that reads ``SomeError: ...``
    (Inductor puts its lowering's error first, then the IR it failed on, then a source excerpt),
    else the last with any text; 200 characters at most."""
    lines = [line.strip() for line in str(exc).splitlines() if re.search(r"\w", line)]
    causes = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)]
    return ((causes or lines or [""])[-1])[:200]


@dataclasses.dataclass(frozen=True)
class _Origin:
    """Where a graph's inputs come from: the namespaces of the frame that runs the code dynamo
    compiled (found when asked) and each input's dynamo source, to find the modules of weights no
    compiled module holds; and the backend that compiled it, whose compiled modules name them."""

    namespaces: Callable[[], _Namespaces | None] | None
    sources: tuple[str, ...]
    backend: Any = None

    @staticmethod
    def of(gm: fx.GraphModule) -> _Origin:
        tx = _compiling_frame()
        namespaces = functools.partial(_running_namespaces, _code_key(tx.f_code)) if tx is not None else None
        sources = tuple(_source(n) for n in gm.graph.nodes if n.op == "placeholder")
        return _Origin(namespaces, sources, _compiling_backend())

    def call_tables(self) -> _CallTables:
        """``_CallTables`` for one call of the graph, reading sources in the frame that runs it."""
        return _CallTables(self.namespaces, self.backend)


class _Runner:
    """What the backend returns: runs the compiled graph with state inputs and counts steps.

    Dynamo hands one compiled graph to every instance of a module class (it checks the weights'
    shapes, not which Parameters they are), so each call finds the states of the weights it is
    given: the compiled weight's own, else a state with these options that the weight already has
    (from another compiled module holding it), else a new one, named from the compiled module it
    belongs to and sharing the weight's progress (found along its ``origin`` source where no
    compiled module on the stack holds it). ``layers`` are the graph's sparse layers, in the order
    their state tensors follow the user's inputs.
    """

    def __init__(
        self,
        compiled: Callable,
        layers: Layers,
        registry: StateRegistry,
        origin: _Origin,
        variants: _Variants | None = None,
        record: CompileRecord | None = None,
        targets: list[tuple[GemmTarget, KernelChoice | None]] | None = None,
        rewritten: bool = False,
        lifted: Sequence[nn.Parameter] = (),
        dense: Sequence[int] = (),
    ) -> None:
        self.compiled = compiled
        self.dense = tuple(dense)  # input positions of the weights whose GEMMs the graph leaves dense
        self.lifted = tuple(lifted)  # Parameters the graph reads as inputs after the caller's (lift_parameters)
        self.origin = origin
        self.variants = variants
        self.record = record  # the report's record of this compile, given the rows of other weights
        self.targets = targets or []  # per layer, its target and kernel: for those rows
        self.rewritten = rewritten  # a graph rewritten for other weights than it was compiled for (_Variants)
        # spec, weight's input, state, and the grad mode the graph sets around the layer (None: the caller's)
        self.layers = [(spec, position, state, grad) for spec, position, state, _, grad in layers]
        self.registry = registry
        # Per layer, the last call's weight and state (the compiled weight's own to start with), and
        # the state of every weight it was called with: one per block where dynamo hands this graph
        # every instance of a block class.
        self._last = [(weakref.ref(anchor(weight)), state) for _, _, state, weight, _ in layers]
        self._known = [WeightKeyDictionary() for _ in layers]

    def _state(self, k: int, weight: torch.Tensor, roots: _CallTables) -> LayerState:
        """Layer ``k``'s state for ``weight``: the last call's where the weight is the same (the
        usual case, one check), else the one found at an earlier call with this weight, else the
        registry's for this layer's options under the name, index and module that hold the weight
        now (located once per weight, and again where its module was replaced: a state another
        compile made for it shares its progress)."""
        last = self._last[k]
        if last[0]() is anchor(weight) and not last[1].orphaned():
            return last[1]
        state = self._known[k].get(weight)
        if state is None or state.orphaned():  # new here, or its module was replaced by one holding the weight
            spec, position = self.layers[k][:2]
            name, index, owner = _locate(weight, spec, roots, self.origin.sources[position])
            state = self.registry.get_or_create(weight, dataclasses.replace(spec, name=name, index=index), owner)
            if state.orphaned():  # no module holds the weight now: unknown, not looked for at every call
                state.set_owner(None)
            self._known[k][weight] = state
            if self.record is not None:
                self.record.add_reused(*self.targets[k], name, state, self.rewritten)
        self._last[k] = (weakref.ref(anchor(weight)), state)
        return state

    def __call__(self, *args: Any) -> Any:
        fake_mode = next((a.fake_mode for a in args if isinstance(a, torch._subclasses.FakeTensor)), None)
        if fake_mode is not None:  # DDP's graph splitting propagates fake inputs: no training step
            extra = [*self.lifted, *(tensor for _, _, state, _ in self.layers for tensor in state.graph_inputs())]
            extra = [t if isinstance(t, torch._subclasses.FakeTensor) else fake_mode.from_tensor(t) for t in extra]
            return self.compiled(*args, *extra)
        args = (*args, *self.lifted)
        roots = self.origin.call_tables()
        variant = self.variants.runner(args, roots) if self.variants is not None else None
        if variant is not None:
            return variant(*args)
        for i in self.dense:  # a weight another compile made sparse runs dense here (forward_weights)
            if (state := self.registry.get(args[i])) is not None:
                state.progress.dense_forward = True
        states = [(self._state(k, args[i], roots), args[i], grad) for k, (_, i, _, grad) in enumerate(self.layers)]
        self.registry.warn_restarted()
        forwards = [(state, state.enter_forward(weight, grad)) for state, weight, grad in states]
        extra = [
            tensor
            for (spec, *_), (state, forward) in zip(self.layers, forwards, strict=True)
            for tensor in state.graph_inputs(forward, spec.index)
        ]
        out = self.compiled(*args, *extra)
        for state, forward in forwards:
            state.exit_forward(forward)
        return out


def _table_use(weight: torch.Tensor, registry: StateRegistry) -> str:
    """How ``weight`` is known to be an embedding's table besides the graph being decided: a
    compiled graph read it in a lookup; ``""`` where none did. A GEMM on it is then a head tied to
    the embedding, which a graph break or a separate compile put in another graph."""
    return "read by one in another compiled graph" if registry.is_lookup_table(weight) else ""


def _locate(
    weight: torch.Tensor, spec: LayerSpec, roots: _CallTables, source: str
) -> tuple[str, int, nn.Module | None]:
    """Name, layer index and owning module of ``weight`` in the compiled modules being called or
    along its ``source``, or the compiled layer's name and index without an owner where none holds it."""
    entry = roots.lookup(weight, source)
    return (entry[0], entry[1], entry[2]) if entry is not None else (spec.name, spec.index, None)


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    config: SparsityConfig,
    registry: StateRegistry = DEFAULT_REGISTRY,
    on_compile: Callable[[CompileRecord], None] | None = None,
    mode: str | None = None,
) -> Callable:
    """Compile one dynamo graph with N:M sparse GEMMs; the body of every ``nmsparse`` backend call.
    ``mode`` is ``torch.compile``'s, passed on to the inner Inductor compile."""
    patches = {**_fusion_patches(config), **_mode_patches(mode, config)}
    # Recompute tags only where the graph runs with autograd: grad on at its entry (else AOTAutograd
    # compiles it for inference, whatever it turns on inside) and an input (or, under Inductor's
    # freezing, a graph attribute) that needs it; and grad on where the region is (inline_subgraphs).
    needing = [*example_inputs, *gm.parameters()]
    autograd = torch.is_grad_enabled() and any(getattr(x, "requires_grad", False) for x in needing)
    lifted = lift_parameters(inline_subgraphs(gm, recompute=autograd))  # Parameters made graph attributes
    gm, example_inputs = lifted.gm, [*example_inputs, *lifted.params]
    roots = _CallTables(_compiling_namespaces, _compiling_backend())
    if on_compile is None and global_backward_hook():  # explain reports it on every weight
        warnings.warn(
            "nmsparse: a global module backward hook (register_module_full_backward_hook) keeps dynamo "
            "(torch 2.13) out of every module's call, so their layers train dense: remove it to train sparse",
            stacklevel=2,
        )
    params = resolve_parameters(gm, example_inputs, roots)
    _warn_if_filters_match_nothing(config, roots)  # after the lookups: a compiled function's model is known
    tables = lookup_tables(gm, params)
    for name in tables:  # first: the graph's own tables are tables in its decisions
        registry.note_lookup_table(params[name].param, params[name].name)
    params = {k: dataclasses.replace(v, lookup=_table_use(v.param, registry)) for k, v in params.items()}
    origin = _Origin.of(gm)
    try:
        fake_mode = torch._guards.TracingContext.get().fake_mode
    except (AssertionError, RuntimeError):
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
    gm, _ = copy_graph_module(gm)
    if decompose_attention(gm).modified:
        _propagate_fake_values(gm)
    code = _compiling_code()
    module_forward = _compiling_module_forward()
    analysis = find_targets(gm, example_inputs, config, params, module_forward)
    _watch_recompile_limit().note(code, bool(analysis.targets))
    if on_compile is None:  # explain reports these itself
        _warn_other_uses(analysis, module_forward)
    rewritten, state_inputs = insert_masks(gm, analysis, config, fake_mode)
    rewritten, kernels = lower_kernels(rewritten, config)
    rewritten = outline_regions(rewritten)
    layers, by_target = _layers(gm, analysis, params, config, registry)
    directory = dump_dir()
    record = None
    if on_compile is not None or directory is not None:
        numbered = {
            t.param_name.removesuffix(".weight"): t.prefix for t in analysis.targets if t.prefix and t.param_name
        }
        names = [_readable_input(n.name, params, numbered) for n in rewritten.graph.nodes if n.op == "placeholder"]
        compile_id = gm.meta.get("dynamo_compile_id")
        trace = torch._guards.CompileContext.current_trace_id()
        attempt = trace.attempt if trace is not None else 0
        record = CompileRecord(analysis, config, compile_id, directory, names, by_target, kernels, attempt)
    examples = [s.example for s in state_inputs]
    # A hit in AOTAutograd's cache skips the inner compiler, so a recorded compile (explain, dumps)
    # leaves it off. The backward it caches is traced from our ops' autograd, which the graph does
    # not show: the key tag's hash of our sources keeps another nmcompile's entries out.
    tags = (torch.compiler.config.cache_key_tag, _source_tag(), _region_tag(rewritten), _c_kernel_tag(analysis, config))
    tag = "|".join(t for t in tags if t)
    # The plain functions the rewrite calls in the graph are safe to cache: the tag holds our sources' hash.
    cacheable = {f"{f.__module__}.{f.__name__}": _source_tag() for f in GRAPH_FUNCTIONS}
    try:
        with (
            torch._functorch.config.patch(
                enable_autograd_cache=record is None and torch._functorch.config.enable_autograd_cache
            ),
            torch.compiler.config.patch(cache_key_tag=tag),
            torch._inductor.config.patch(
                unsafe_marked_cacheable_functions={
                    **torch._inductor.config.unsafe_marked_cacheable_functions,
                    **cacheable,
                }
            ),
        ):
            compiled = _compile_inner(rewritten, [*example_inputs, *examples], config, record, patches)
    except Exception as exc:  # dynamo runs the graph eagerly, dense, or raises: the report must not say sparse
        if record is not None and not isinstance(exc, torch._dynamo.exc.RestartAnalysis):
            record.fail(exc)
        raise
    if on_compile is not None and record is not None:  # explain's, once the graph compiled
        on_compile(record)
    variants = _Variants(gm, config, registry, fake_mode, params, origin, tables, record, module_forward)
    targets = [(t, kernels.get(t.layer)) for t in analysis.sparse]
    dense = _dense_positions(gm, analysis, params)
    return _Runner(compiled, layers, registry, origin, variants, record, targets, lifted=lifted.params, dense=dense)


def _warn_other_uses(analysis: Any, module_forward: bool) -> None:
    """Warn, once per weight, where this graph leaves a weight dense as tied (SPEC §10) because the
    compiled function uses it outside the model's forward (a training step compiled whole: weight
    clipping, a penalty on the loss, a logged norm), where the reference, which sees the forward
    only, trains the layer sparse. Ties inside the forward are the report's (no remedy to give):
    nothing warns where the compiled code is a module's forward (``module_forward``, also where
    the code is not known)."""
    if module_forward:
        return
    warned = set()
    for target in analysis.targets:
        name = target.param_name or target.node.name
        if not target.reason.startswith("tied: parameter used by") or name in warned:
            continue
        outside = target.uses_outside_forward()
        if outside:
            warned.add(name)
            warnings.warn(
                f"nmsparse: {name} trains dense: the compiled function also uses it outside the model's "
                f"forward ({', '.join(outside)}), a tie in one graph (SPEC §10), where the reference, which "
                "sees the forward only, trains it sparse; compile the model itself with nmsparse and the "
                "rest of the step without it (README, 'What gets sparsified')",
                stacklevel=2,
            )


def _compiling_module_forward() -> bool:
    """Whether dynamo compiles a module's forward (``torch.compile(model)``; a graph break's resume
    of it; ``nn.Sequential`` through dynamo's ``inner`` wrapper), not a function that calls one,
    even one named ``forward``: the code is the ``forward`` (or a decorator's wrapper of it) of its
    first argument's module or of a compiled module being called (a forward set on the instance,
    a closure or a ``functools.partial``). ``True`` where dynamo's tracer is not at hand (pieces of
    a forward, as DDP's)."""
    tx = _compiling_frame()
    if tx is None:
        return True
    root = tx.output.root_tx
    code = root.f_code
    if code.co_name.startswith("torch_dynamo_resume_in_forward_at_"):
        return True
    if _is_module_wrapper(code.co_name, code.co_filename):
        return True
    owners = _compiled_roots()
    if code.co_argcount:
        owners.insert(0, root.f_locals.get(code.co_varnames[0]))
    return any(isinstance(owner, nn.Module) and code in _forward_codes(owner) for owner in owners)


def _is_module_wrapper(name: str, filename: str) -> bool:
    """Whether the code is dynamo's ``inner`` (``wrap_inline``), the frame it compiles for every
    ``torch.nn`` module given to ``torch.compile`` itself (``nn.Sequential``, ``nn.Linear``, ...)."""
    return name == "inner" and filename.endswith(os.path.join("_dynamo", "external_utils.py"))


def _forward_codes(module: nn.Module) -> list[types.CodeType]:
    """The code objects a call of ``module``'s ``forward`` may run first: its function's (the
    class's, or one set on the instance), and those of the decorators' wrappers around it, through
    bound methods and ``functools.partial``."""
    codes = []
    for method in [vars(cls).get("forward") for cls in type(module).__mro__] + [vars(module).get("forward")]:
        seen = 0
        while method is not None and seen < 16:  # a wrapper chain, bounded: a __wrapped__ cycle never ends
            seen += 1
            method = getattr(method, "__func__", method)
            if isinstance(method, functools.partial):
                method = method.func
                continue
            if isinstance(getattr(method, "__code__", None), types.CodeType):
                codes.append(method.__code__)
            method = getattr(method, "__wrapped__", None)
    return codes


class _RecompileLimitWatch(logging.Filter):
    """Turns dynamo's "hit config.recompile_limit" log line for a compile that stops nmsparse's
    into a warning that says what it means here: dynamo runs that code eagerly from then on, so its
    layers train dense and their steps stop. Dynamo calls no backend then, so its log is the only
    sign. The log names the function, not the backend, so a function that nmsparse and another
    backend both compiled warns at the other's limit too: rightly, since dynamo then stops
    compiling that code for every backend (an nmsparse model's new shapes and modes run eagerly,
    dense; its graphs already compiled still run); not where the two have caches of their own
    (``isolate_recompiles=True`` on either), so that one's limit leaves the other alone. The filter
    only reads records and lets every one through."""

    def __init__(self) -> None:
        super().__init__()
        self.compiled: set[_CodeKey] = set()  # the code of every graph nmsparse compiled
        self.gemm_files: set[str] = set()  # the files of those with a GEMM, sparse or not

    def note(self, code: _CodeKey | None, gemms: bool) -> None:
        """nmsparse compiled a graph of ``code`` (``None``: not known, as under DDP's graph splitting),
        with GEMMs (sparse, or dense for now: frozen) or none (an optimizer's ``step``)."""
        if code is not None:
            self.compiled.add(code)
            if gemms:
                self.gemm_files.add(code[1])

    def without_gemms(self) -> set[_CodeKey]:
        """Compiled code of ``torch.optim`` (an optimizer's ``step`` and its wrappers) whose file gave
        nmsparse no GEMM in any graph: past its limit, running it eagerly loses nothing. Other code
        may hold a model whose layers come later (after a graph break, in another file's blocks,
        frozen for now), so it warns."""
        optim = os.path.dirname(torch.optim.__file__) + os.sep
        return {code for code in self.compiled if code[1].startswith(optim) and code[1] not in self.gemm_files}

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("torch._dynamo hit config.") and len(record.args or ()) >= 3:
            limit, value, function = record.args[:3]  # type: ignore[index]
            stops = _stops_nmsparse(self.without_gemms())  # None: dynamo's frame not found; by the name
            compiled = [code for code in self.compiled if _logged_name(code) == function]
            if stops or (stops is None and compiled):
                shared = any(_is_module_wrapper(name, filename) for name, filename, _ in compiled)
                warnings.warn(
                    f"nmsparse: dynamo hit its {limit} ({value}) for {function}, a function nmsparse has "
                    "compiled: dynamo runs it eagerly from now on, so an nmsparse model there trains dense and "
                    "its layers' steps stop (sparsity_state). Every option set, train/eval/no_grad mode and "
                    "static shape counts; "
                    + (
                        "here, every torch.nn module given to torch.compile itself (nn.Sequential, say) counts "
                        "too, in this whole process: dynamo compiles them all through this one 'inner' wrapper; "
                        if shared
                        else ""
                    )
                    + "pass isolate_recompiles=True to torch.compile, call torch._dynamo.reset() between "
                    "runs, or raise torch._dynamo.config.recompile_limit (README, 'Recompiles')",
                    stacklevel=2,
                )
        return True


def _logged_name(code: _CodeKey) -> str:
    """``code`` as dynamo's recompile-limit log line names its function."""
    name, filename, line = code
    return f"'{name}' ({filename}:{line})"


def _stops_nmsparse(dense_codes: set[_CodeKey]) -> bool | None:
    """Whether the compile dynamo refuses now stops an nmsparse compile of sparse layers: its code
    is not among ``dense_codes`` (an optimizer's ``step``, whose file gave nmsparse no GEMM, loses
    nothing), and the compile is nmsparse's (also of a wrapper's code, as
    ``torch.compile(DDP(model))``'s), or the code cache it counts in (a wrapper's own under
    ``isolate_recompiles``, else the shared one) holds an nmsparse graph of its code; ``None``
    where dynamo's compile frame is not found (another torch)."""
    from torch._dynamo import eval_frame

    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "_compile" and "compiler_fn" in frame.f_locals):
        frame = frame.f_back
    region = getattr(eval_frame, "get_eval_frame_isolate_recompiles_id", None)
    if frame is None or region is None or not isinstance(frame.f_locals.get("code"), types.CodeType):
        return None
    if _code_key(frame.f_locals["code"]) in dense_codes:
        return False
    entries = eval_frame._get_cache_entries_for_region(frame.f_locals["code"], region())
    return any(map(_is_nmsparse, [frame.f_locals["compiler_fn"], *(entry.backend for entry in entries)]))


def _is_nmsparse(backend: Any) -> bool:
    """Whether a backend dynamo holds (wrapped or not) is nmsparse's."""
    from torch._dynamo.eval_frame import innermost_backend

    backend = innermost_backend(backend)
    backend = getattr(backend, "compiler_fn", backend)  # torch.compile's wrapper of a backend given options
    return isinstance(backend, NMSparseBackend) or backend is nmsparse


def _compiling_code() -> _CodeKey | None:
    """The code dynamo is compiling (``None`` where dynamo's tracer is not at hand)."""
    tx = _compiling_frame()
    return _code_key(tx.output.root_tx.f_code) if tx is not None else None


@functools.cache
def _watch_recompile_limit() -> _RecompileLimitWatch:
    """The one ``_RecompileLimitWatch``, on the logger of dynamo's frame conversion."""
    watch = _RecompileLimitWatch()
    logging.getLogger("torch._dynamo.convert_frame").addFilter(watch)
    return watch


def _region_tag(gm: fx.GraphModule) -> str:
    """A digest of the activation-checkpoint tags of ``gm``'s nodes (``inline_subgraphs``), for the
    compile caches' key: AOTAutograd's hashes the graph's code, not its nodes' metadata, so a model
    with and without a checkpoint can have one key, and the second would load the first's
    partition (what it saves for the backward); ``""`` where no node has them."""
    tags = [
        (n.name, str(n.meta.get("recompute")), n.meta["ac_graph_id"]) for n in gm.graph.nodes if "ac_graph_id" in n.meta
    ]
    return f"regions-{hashlib.sha256(repr(tags).encode()).hexdigest()[:16]}" if tags else ""


def _c_kernel_tag(analysis: Any, config: SparsityConfig) -> str:
    """``"c-mask-kernels"`` where a sparse layer's masks can run on the C kernels (``cpu_mask``), for
    the compile caches' key: the backward AOTAutograd traces from the ops calls them only where the
    library is there, and the graph it keys on can be the same without them (a convolution's)."""
    from nmcompile.kernels import cpu_mask

    for target in analysis.sparse:
        value = example_value(target.weight)
        if isinstance(value, torch.Tensor) and cpu_mask.blocker(value, config.m) is None:
            return "c-mask-kernels"
    return ""


@functools.cache
def _source_tag() -> str:
    """``nmcompile-<hash>`` of the package's Python sources (passes and kernels included): the part
    of torch.compile's cache key that tells this nmcompile's compiles from another's."""
    import nmcompile
    from nmcompile import passes

    digest = hashlib.sha256()
    for root in sorted({Path(nmcompile.__file__).parent, Path(passes.__file__).parent}):
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{path.relative_to(root)}\0".encode() + path.read_bytes())
    return f"nmcompile-{digest.hexdigest()[:16]}"


def _warn_if_filters_match_nothing(config: SparsityConfig, roots: _CallTables) -> None:
    """Warn where ``include`` admits no parameter of the compiled model (a typo there trains the
    whole model dense), and per ``exclude`` pattern that matches none (a typo, or a name written
    without a wrapper's step such as DDP's ``module.``, trains sparse the layer meant to stay
    dense); nothing else says so outside ``explain``."""
    names = [entry[0] for table in roots.known() for entry in table.values()]
    if not names:
        return
    if config.include and not any(re.search(pattern, name) for pattern in config.include for name in names):
        warnings.warn(
            f"nmsparse include={list(config.include)} matches no parameter of the compiled model "
            f"(its parameters are named as {names[0]!r}): every layer stays dense",
            stacklevel=2,
        )
    for pattern in config.exclude:
        if not any(re.search(pattern, name) for name in names):
            warnings.warn(
                f"nmsparse exclude pattern '{pattern}' matches no parameter of the compiled model "
                f"(its parameters are named as {names[0]!r}): it keeps no layer dense",
                stacklevel=2,
            )


Layers = list[tuple[LayerSpec, int, LayerState, torch.Tensor, bool | None]]


def _dense_positions(gm: fx.GraphModule, analysis: Any, params: Mapping[str, ParamInfo]) -> list[int]:
    """The input positions of the trainable parameters whose GEMMs ``analysis`` leaves dense. A
    frozen one is left out: ``forward_weights`` leaves it out anyway, and a call looks each one up
    (a frozen backbone's every layer); unfreezing it recompiles the graph."""
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    dense = {t.weight.name for t in analysis.targets if not t.sparse and t.weight is not None}
    trainable = {name for name in dense if name in params and params[name].param.requires_grad}
    return [placeholders.index(name) for name in sorted(trainable) if name in placeholders]


def _layers(
    gm: fx.GraphModule, analysis: Any, params: dict[str, ParamInfo], config: SparsityConfig, registry: StateRegistry
) -> tuple[Layers, dict[int, LayerState]]:
    """Per sparse target of ``analysis``, in the order insert_masks appended their state inputs:
    its spec, its weight's input position, its state and weight, and the grad mode the graph sets
    around its GEMM (``passes.utils.grad_modes``); and the states by target."""
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    modes = grad_modes(gm)
    layers: Layers = []
    by_target: dict[int, LayerState] = {}
    for target in analysis.sparse:
        info = params[target.weight.name]
        groups = target.conv.groups if target.conv is not None else 1
        rows = target.weight_shape[0]
        spec = LayerSpec(info.name, info.index, rows, target.backward, target.layout, groups, config, info.param.dtype)
        state = registry.get_or_create(info.param, spec, info.owner)
        layers.append((spec, placeholders.index(target.weight.name), state, info.param, modes.get(target.node)))
        by_target[id(target)] = state
    registry.warn_restarted()
    return layers, by_target


@dataclasses.dataclass(frozen=True)
class _Known:
    """A weight as ``find_targets`` sees it, holding no reference to it: name, index, ties, owner."""

    name: str
    index: int
    shared_as: tuple[str, ...]
    owner: weakref.ref | None
    lookup: str

    @staticmethod
    def of(info: ParamInfo) -> _Known:
        owner = weakref.ref(info.owner) if info.owner is not None else None
        return _Known(info.name, info.index, info.shared_as, owner, info.lookup)

    def info(self, weight: torch.Tensor, tied: bool = False) -> ParamInfo:
        """``ParamInfo`` for ``weight``; ``tied``: it is also another input of the graph."""
        shared_as = (*self.shared_as, "another input of this graph") if tied else self.shared_as
        owner = self.owner() if self.owner else None
        return ParamInfo(self.name, self.index, weight, owner, shared_as, self.lookup)


class _Variants:
    """The graph rewritten for the weights of a call, where they are not the ones it was compiled
    for and ``find_targets`` would decide otherwise for them.

    Dynamo reuses a graph for every instance of a module class around a graph break, and after a
    weight is tied (``b.weight = a.weight``), as its guards read shapes, not which Parameters
    come. Where an ``include``/``exclude`` name filter or a tie makes another choice for a call's
    weights, that call runs the graph rewritten for them, eagerly (the inner compiler never saw
    it), with a warning the first time. It holds weights, modules and inputs weakly or not at all,
    as ``_Runner`` does (dynamo's example inputs are the first call's real tensors).
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        config: SparsityConfig,
        registry: StateRegistry,
        fake_mode: Any,
        params: dict[str, ParamInfo],
        origin: _Origin,
        tables: Collection[str],
        record: CompileRecord | None = None,
        module_forward: bool = True,
    ) -> None:
        self.gm, self.config, self.origin, self.record = gm, config, origin, record
        self.module_forward = module_forward  # as find_targets takes it
        self.registry, self.fake_mode = registry, fake_mode
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self.inputs = [(placeholders.index(name), name, _Known.of(info)) for name, info in params.items()]
        self._tables = [name in tables for name in params]  # per input: this graph reads it as an embedding table
        self.compiled_choice = tuple(
            self._choice(known, self._admitted(known), table=table)
            for (_, _, known), table in zip(self.inputs, self._tables, strict=True)
        )
        self._seen = WeightKeyDictionary()  # weight -> (its _Known, whether the name filter admits it), found once
        self._runners: dict[tuple, _Runner] = {}
        self._targets: dict[tuple, list[GemmTarget]] = {}  # the targets of each rewritten graph, for the report
        self._fits = [weakref.ref(anchor(info.param)) for info in params.values()]
        self._fitting = WeightKeyDictionary()  # first weight -> all weights of a call the compiled graph fits
        self._generation = registry.lookup_generation  # the embedding tables known when the fits were found

    def _admitted(self, known: _Known) -> bool:
        return self.config.name_filter_reason(known.name) is None

    @staticmethod
    def _choice(known: _Known, admitted: bool, tied: bool = False, table: bool = False) -> tuple[bool, bool]:
        """What ``find_targets`` reads from a weight's name and ties: the name filter admits it, and
        it is tied (which changes nothing for a weight the filter leaves out). ``table``: this graph
        looks the weight up itself, so a table elsewhere changes nothing here (its own lookup and
        any GEMM on it are two nodes of one graph)."""
        return admitted, admitted and (tied or bool(known.shared_as or (known.lookup and not table)))

    def _known(self, weight: torch.Tensor, position: int, compiled: _Known, roots: _CallTables) -> tuple[_Known, bool]:
        entry = self._seen.get(weight)
        if entry is None:
            found = roots.lookup(weight, self.origin.sources[position])
            lookup = _table_use(weight, self.registry)
            if found is None:
                known = dataclasses.replace(compiled, lookup=lookup)
            else:
                known = _Known.of(ParamInfo(*found[:2], weight, *found[2:], lookup))
            entry = self._seen[weight] = (known, self._admitted(known))
        return entry

    def runner(self, args: Sequence[Any], roots: _CallTables) -> _Runner | None:
        """The runner of the graph rewritten for ``args``' weights, or ``None`` where the compiled one fits."""
        weights = [args[position] for position, _, _ in self.inputs]
        # A weight became a table: decide ties again; not in a checkpoint's recompute of a forward
        # run before it (in the backward), which must run as that forward did.
        if self._generation != self.registry.lookup_generation and not in_backward():
            self._generation = self.registry.lookup_generation
            self._seen, self._fitting = WeightKeyDictionary(), WeightKeyDictionary()
            self._fits = [lambda: None for _ in self.inputs]
        if all(ref() is anchor(w) for ref, w in zip(self._fits, weights, strict=True)):
            return None  # the weights of the last call the compiled graph fitted: the usual case
        fitted = self._fitting.get(weights[0])  # another block's weights it fitted at an earlier call
        if fitted is not None and all(ref() is anchor(w) for ref, w in zip(fitted, weights, strict=True)):
            self._fits = fitted
            return None
        entries = [self._known(w, p, k, roots) for w, (p, _, k) in zip(weights, self.inputs, strict=True)]
        for (known, _), w, table in zip(entries, weights, self._tables, strict=True):
            if table:  # another model's lookup through this graph: a table for heads elsewhere too
                self.registry.note_lookup_table(w, known.name)
        ids = [id(w) for w in weights]
        tied = [ids.count(i) > 1 for i in ids]  # a weight at two inputs: tied after compiling
        choice = tuple(
            self._choice(k, admitted, t, table)
            for (k, admitted), t, table in zip(entries, tied, self._tables, strict=True)
        )
        if choice == self.compiled_choice:
            self._fits = self._fitting[weights[0]] = [weakref.ref(anchor(w)) for w in weights]
            runner = None
        else:
            runner = self._runners.get(choice) or self._rewrite(choice, weights, entries, tied)
        if self.record is not None:  # the report's rows for this call's weights the graph leaves dense
            names = {name: known.name for (_, name, _), (known, _) in zip(self.inputs, entries, strict=True)}
            self.record.add_dense(names, self._targets.get(choice))
        return runner

    def _rewrite(self, choice: tuple, weights: list[torch.Tensor], entries: list, tied: list[bool]) -> _Runner:
        """The runner of the graph rewritten for ``choice``, made for the weights of this call (its
        sparse layers get rows in the report), with a warning."""
        params = {
            name: k.info(w, t) for (_, name, _), (k, _), w, t in zip(self.inputs, entries, weights, tied, strict=True)
        }
        examples = [n.meta.get("example_value") for n in self.gm.graph.nodes if n.op == "placeholder"]
        for (position, _, _), w in zip(self.inputs, weights, strict=True):
            examples[position] = w  # find_targets reads weights' values only
        analysis = find_targets(self.gm, examples, self.config, params, self.module_forward)
        rewritten, _ = insert_masks(self.gm, analysis, self.config, self.fake_mode)
        rewritten = outline_regions(rewritten)
        layers, by_target = _layers(self.gm, analysis, params, self.config, self.registry)
        if self.record is not None:
            self.record.add_rewritten(analysis, by_target)
        self._targets[choice] = analysis.targets
        targets = [(t, None) for t in analysis.sparse]
        runner = self._runners[choice] = _Runner(
            rewritten, layers, self.registry, self.origin, None, self.record, targets, True,
            dense=_dense_positions(self.gm, analysis, params),
        )  # fmt: skip
        sparse = ", ".join(t.param_name for t in analysis.sparse) or "none"
        warnings.warn(
            "nmsparse: dynamo reuses a compiled graph for weights that include/exclude or a weight tie "
            f"sparsify otherwise (sparse now: {sparse}); these calls run the graph rewritten for them "
            "eagerly, not compiled. A graph break inside a repeated block, or a tie made after compiling, "
            "causes this",
            stacklevel=4,
        )
        return runner


class NMSparseBackend:
    """A ``torch.compile`` backend with fixed, validated options (``nmcompile.backend(**options)``).
    ``on_compile`` receives each compiled graph's record; ``on_failure`` each graph whose compile
    raised, with its example inputs and parameters and the exception (which then goes on to dynamo)."""

    __name__ = "nmsparse"

    def __init__(
        self,
        config: SparsityConfig,
        registry: StateRegistry = DEFAULT_REGISTRY,
        on_compile: Callable[[CompileRecord], None] | None = None,
        on_failure: Callable[[fx.GraphModule, Sequence[Any], Exception], None] | None = None,
    ) -> None:
        if not isinstance(config, SparsityConfig):
            raise SparsityConfigError(
                f"NMSparseBackend takes a SparsityConfig, got {type(config).__name__} {config!r}: "
                "use nmcompile.backend(**options), or SparsityConfig.from_options(options)"
            )
        if not isinstance(registry, StateRegistry):
            raise SparsityConfigError(f"NMSparseBackend registry= takes a StateRegistry, got {type(registry).__name__}")
        for name, callback in (("on_compile", on_compile), ("on_failure", on_failure)):
            if callback is not None and not callable(callback):
                raise SparsityConfigError(
                    f"NMSparseBackend {name}= takes a callable or None, got {type(callback).__name__} {callback!r}"
                )
        self.config = config
        self.registry = registry
        self.on_compile = on_compile
        self.on_failure = on_failure

    def __call__(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None, options: Any = None
    ) -> Callable:
        if options is not None:
            raise SparsityConfigError(
                f"torch.compile options={options!r} with a nmcompile.backend(...) object: give the options "
                'to nmcompile.backend(...), or use backend="nmsparse" with options={...}'
            )
        operands = [*example_inputs, *gm.parameters()]  # before the compile lifts them
        try:
            return compile_graph(gm, example_inputs, self.config, self.registry, self.on_compile, mode)
        except torch._dynamo.exc.RestartAnalysis:  # dynamo traces again and calls the backend anew
            raise
        except Exception as exc:  # dynamo runs the graph eagerly, dense, or raises it: the callback hears why
            if self.on_failure is not None:
                self.on_failure(gm, operands, exc)
            raise

    def __repr__(self) -> str:
        return f"nmcompile.backend({self.config})"

    def __deepcopy__(self, memo: dict) -> NMSparseBackend:
        """Itself: a deep copy of a compiled model keeps this backend, so its states stay in the
        registry ``sparsity_state`` and ``state_dict`` read, and dynamo reuses its graphs."""
        return self

    def __reduce__(self) -> tuple:
        """Pickled as its options: ``torch.save`` of a compiled model loads with the shared backend
        of those options, as ``nmcompile.backend(...)`` gives, on the default registry (an
        ``explain`` registry or ``on_compile``/``on_failure`` callback does not travel)."""
        return (_shared_backend, (self.config,))


def backend(**options: Any) -> NMSparseBackend:
    """``torch.compile(model, backend=nmcompile.backend(n=2, m=4, ...))``; options checked here, now.

    Equal options give the same object: dynamo guards its graphs on the backend's identity, so a
    new object per compile of one model class would recompile each time and, past
    ``torch._dynamo.config.recompile_limit``, run the model eagerly, dense."""
    return _shared_backend(SparsityConfig.from_options(options))


@functools.cache
def _shared_backend(config: SparsityConfig) -> NMSparseBackend:
    return NMSparseBackend(config)


def nmsparse(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None, mode: str | None = None
) -> Callable:
    """The registered ``"nmsparse"`` backend: ``torch.compile(model, backend="nmsparse", options={...})``."""
    config = SparsityConfig.from_options(options)
    return compile_graph(gm, example_inputs, config, mode=mode)
