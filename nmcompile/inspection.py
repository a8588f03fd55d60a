"""What the backend did, for people: report rows, rewritten graphs, ``explain`` and dumps.

Every compile can produce a ``CompileRecord`` (the eligibility table plus the forward, backward
and inference graphs AOTAutograd produced, with readable node names). ``explain`` compiles a model
once on the side and returns them as a ``Report``; ``NMSPARSE_DUMP_DIR`` writes them to disk for
every compile during ordinary ``torch.compile`` use.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
from torch import fx
from torch.nn.parameter import is_lazy

from nmcompile.ops import node_role
from nmcompile.options import SparsityConfig
from nmcompile.passes.utils import copy_graph_module, size_hint

if TYPE_CHECKING:
    from nmcompile.passes import GemmTarget, KernelChoice, TargetAnalysis
    from nmcompile.state import LayerState

# Why no graph was compiled for a model compiled in place (``model.compile``) whose forward is torch.nn's
# own: dynamo skips torch.nn's frames there, with any backend (torch 2.13), and calls no backend.
IN_PLACE_NOTE = (
    "{} compiled in place (model.compile) runs torch.nn's own forward, which dynamo (torch 2.13) does not "
    "compile: it trains dense; use torch.compile(model, backend=...)"
)
_dump_counter = itertools.count()


def dump_dir() -> Path | None:
    """The directory named by ``NMSPARSE_DUMP_DIR``, or ``None`` when unset."""
    value = os.environ.get("NMSPARSE_DUMP_DIR")
    return Path(value) if value else None


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One GEMM-like node in the report: what it is and what was decided, with FLOPs per GEMM."""

    name: str
    op: str
    weight_shape: tuple[int, int] | None
    input_shape: tuple | None
    conv: str  # kernel, stride, padding, dilation, groups of a convolution; "" for a GEMM
    nm: str
    sparse: bool
    backward: str
    reason: str
    flops: dict[str, tuple[int, int] | None]
    now: str = "-"  # step, N:M in force and mask-decay factor when the row was made
    n_effective: int | None = None
    alpha: float | None = None
    kernel: str = "-"  # "triton", "sparse24" or "portable", with a note in brackets; "-" when dense
    input_dims: tuple[str, ...] | None = None  # x's sizes as traced: "s0" for a dynamic one, "?" unbacked
    dynamic: tuple[tuple[str, int], ...] = ()  # the dynamic sizes in this GEMM, at the values first seen

    @classmethod
    def from_target(
        cls,
        target: GemmTarget,
        config: SparsityConfig,
        state: LayerState | None = None,
        kernel: KernelChoice | None = None,
    ) -> LayerRow:
        """A row for ``target``; ``state`` (if sparse) gives the step, N and decay factor in force,
        ``kernel`` the implementation ``lower_kernels`` chose."""
        n, alpha, now = config.n, None, "-"
        if state is not None:
            n, alpha = state.mask_n(), state.alpha()
            now = f"t={state.step} {n}:{config.m}" + (f" α={alpha:.3g}" if alpha is not None else "")
        return cls(
            name=target.param_name or f"<{target.node.name}>",
            op=target.op,
            weight_shape=target.weight_shape,
            input_shape=tuple(map(size_hint, target.input_shape)) if target.input_shape is not None else None,
            conv=target.conv.describe() if target.conv is not None else "",
            nm=f"{config.n}:{config.m}" if target.sparse else "-",
            sparse=target.sparse,
            backward=target.backward if target.sparse else "-",
            reason=target.reason,
            flops=target.flops(n, config.m, alpha, config.grad_prune),
            now=now,
            n_effective=n if state is not None else None,
            alpha=alpha,
            kernel=_describe(kernel) if target.sparse and kernel is not None else "-",
            input_dims=tuple(_dim(size) for size in target.input_shape) if target.input_shape is not None else None,
            dynamic=tuple(target.dynamic.items()),
        )


def _dim(size: Any) -> str:
    """A size as the report prints it: a number, a dynamic size's expression (``s0``, ``2*s0``), or
    ``?`` for an unbacked one (data-dependent: no value was seen when tracing)."""
    return "?" if size_hint(size) is None else str(size)


def _new_directory(parent: Path, name: str) -> Path:
    """A new directory ``parent/name``, or ``name_2``, ``name_3``, ... where an earlier run left one
    (same process id: a container's PID 1), so no dump writes into another's."""
    parent.mkdir(parents=True, exist_ok=True)
    path, count = parent / name, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            count += 1
            path = parent / f"{name}_{count}"


def _warn_unwritable(directory: Path, err: OSError) -> None:
    warnings.warn(
        f"nmsparse: cannot write the NMSPARSE_DUMP_DIR dump under {directory} ({err}); compiling without it",
        stacklevel=3,
    )


def _describe(choice: KernelChoice) -> str:
    return choice.kernel if not choice.reason else f"{choice.kernel} ({choice.reason})"


def _fmt_flops(pair: tuple[int, int] | None) -> str:
    if pair is None:
        return "?"

    def short(v: float) -> str:
        """Three significant digits in the smallest unit that keeps them under 1000 once rounded
        (999,936 is ``1M``, not ``1e+03K``)."""
        for unit, scale in (("", 1.0), ("K", 1e3), ("M", 1e6), ("G", 1e9)):
            text = f"{v / scale:.3g}"
            if float(text) < 1000:
                return text + unit
        return f"{v / 1e12:.3g}T"

    dense, nm = pair
    return short(dense) if dense == nm else f"{short(dense)}→{short(nm)}"


def format_table(rows: list[LayerRow]) -> str:
    """The report table: one line per GEMM-like node, FLOPs as ``dense→N:M-executable``; ``now`` is
    the step, the N:M in force and the mask-decay factor; ``kernel`` the implementation each sparse
    GEMM runs on (with the reason where it is the portable one); a ``conv`` column (kernel, stride,
    padding, dilation, groups) when there are convolutions."""
    with_conv = any(r.conv for r in rows)
    header = [
        "parameter",
        "op",
        "W [O,K]",
        "x",
        "N:M",
        "status",
        "backward",
        "now",
        "kernel",
        "fwd FLOPs",
        "dX FLOPs",
        "dW FLOPs",
        "why",
    ]
    if with_conv:
        header.insert(4, "conv")
    lines = [header]
    for r in rows:
        line = [
            r.name,
            r.op,
            "x".join(map(str, r.weight_shape)) if r.weight_shape else "-",
            "x".join(r.input_dims) if r.input_dims else "?",
            r.nm,
            "sparse" if r.sparse else "dense",
            r.backward,
            r.now,
            r.kernel,
            _fmt_flops(r.flops["forward"]),
            _fmt_flops(r.flops["input_grad"]),
            _fmt_flops(r.flops["weight_grad"]),
            r.reason,
        ]
        if with_conv:
            line.insert(4, r.conv or "-")
        lines.append(line)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = [" | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    if not rows:
        out.append("(no GEMM-like node in this graph: nothing to sparsify)")
    dynamic = dict(pair for r in rows for pair in r.dynamic)
    if dynamic:
        seen = ", ".join(f"{name}={value}" for name, value in sorted(dynamic.items()))
        out.append(f"dynamic sizes, as first seen: {seen}; the shapes and FLOPs above are at those values")
    return "\n".join(out)


class CompileRecord:
    """The table and the AOTAutograd graphs of one backend compile (one dynamo graph)."""

    def __init__(
        self,
        analysis: TargetAnalysis,
        config: SparsityConfig,
        compile_id: Any = None,
        directory: Path | None = None,
        input_names: list[str] | None = None,
        states: dict[int, LayerState] | None = None,
        kernels: dict[str, KernelChoice] | None = None,
        attempt: int = 0,
    ) -> None:
        states, kernels = states or {}, kernels or {}
        self.rows = [LayerRow.from_target(t, config, states.get(id(t)), kernels.get(t.layer)) for t in analysis.targets]
        # The weight each GEMM node was compiled for, named in the rows of other weights that dynamo
        # hands this graph (another block of a class with a graph break inside).
        self._compiled_for = {t.node.name: t.param_name for t in analysis.targets}
        self._targets = analysis.targets
        self.other_uses = dict(analysis.other_uses)  # parameter name -> what used it, where no GEMM did
        self.input_names = input_names or []
        self.config = config
        self.compile_id = str(compile_id) if compile_id is not None else None
        self.attempt = attempt  # dynamo's restarts of this compile's analysis before it (it drops their graphs)
        self.graphs: dict[str, fx.GraphModule] = {}
        self._forward_names: dict[str, str] = {}  # joint-graph name -> name in the forward's copy
        self.directory: Path | None = None
        if directory is not None:
            tag = (self.trace_id or "graph").replace("/", "_")
            try:
                self.directory = _new_directory(directory, f"{os.getpid()}_{next(_dump_counter)}_{tag}")
            except OSError as err:
                _warn_unwritable(directory, err)
            self._dump("report.txt", format_table(self.rows) + "\n")

    def fail(self, exc: BaseException) -> None:
        """The graph did not compile (``exc``): its dump says so beside the table it was to run."""
        self._dump(
            "failed.txt",
            f"the backend's compile of this graph raised {type(exc).__name__}: {exc}\n"
            "dynamo raised it, or ran the graph eagerly: its layers ran dense, their states did not step\n",
        )

    def add_reused(
        self, target: GemmTarget, kernel: KernelChoice | None, name: str, state: LayerState, rewritten: bool = False
    ) -> None:
        """A row for weight ``name``, which runs the sparse layer ``target`` of this graph (dynamo
        reuses a graph for every instance of a module class), or of this graph ``rewritten`` for the
        weights of a call (``add_rewritten``), unless it has one."""
        if any(row.name == name for row in self.rows):
            return
        row = LayerRow.from_target(target, self.config, state, kernel)
        how = ", rewritten for its weights (eagerly)" if rewritten else ""
        reason = f"{row.reason}; runs the graph compiled for {self._compiled_for[target.node.name]}{how}"
        self._add_row(dataclasses.replace(row, name=name, reason=reason))

    def add_rewritten(self, analysis: TargetAnalysis, states: dict[int, LayerState]) -> None:
        """Rows for the sparse layers of a call that runs this graph rewritten for its weights, where
        include/exclude or a tie decides otherwise for them than for the weights it was compiled for."""
        for target in analysis.sparse:
            self.add_reused(target, None, target.param_name, states[id(target)], rewritten=True)

    def add_dense(self, names: Mapping[str, str], targets: list[GemmTarget] | None = None) -> None:
        """Rows for the dense GEMMs of this graph (or of ``targets``: it rewritten for them) as a call
        with other weights runs it; ``names`` maps each weight input to the call's parameter name."""
        for target in self._targets if targets is None else targets:
            name = names.get(target.weight.name) if target.weight is not None and not target.sparse else None
            if name is None or any(row.name == name for row in self.rows):
                continue
            row = LayerRow.from_target(target, self.config, None, None)
            reason = f"{row.reason}; in the graph compiled for {self._compiled_for[target.node.name]}"
            self._add_row(dataclasses.replace(row, name=name, reason=reason))

    def _add_row(self, row: LayerRow) -> None:
        """Append ``row``, and write the table again where the compile is dumped (``report.txt``)."""
        self.rows.append(row)
        if self.directory is not None:
            self._dump("report.txt", format_table(self.rows) + "\n")

    @property
    def trace_id(self) -> str | None:
        """The compile id as dynamo's logs write it: ``0/1``, or ``0/1_1`` for its first restart."""
        if self.compile_id is None:
            return None
        return f"{self.compile_id}_{self.attempt}" if self.attempt else self.compile_id

    def add_graph(self, kind: str, gm: fx.GraphModule, renamed: dict[str, str] | None = None) -> None:
        """Keep a copy of a graph AOTAutograd produced (``forward``/``backward``/``inference``);
        ``renamed`` maps the names AOTAutograd gave its nodes to those the naming pass gave them.

        In the copy of a forward or inference graph, placeholders are renamed after what they
        carry (``fc1_weight``, ``fc1_perm``, ...) when they line up with the graph's inputs. In the
        copy of a backward graph, the tensors the forward saved for it take their forward names
        (``fc1_weight``, ``fc1_fwd_masked``): both graphs come from one joint graph, whose names the
        backward's inputs still carry.
        """
        gm = copy_graph_module(gm)[0]
        names = dict(renamed or {})
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if kind == "backward":
            targets = [(node, self._forward_names.get(node.name)) for node in placeholders]
        elif len(placeholders) == len(self.input_names):
            targets = list(zip(placeholders, self.input_names, strict=True))
        else:
            targets = []
        for node, name in targets:  # the naming pass renames no placeholder: theirs are the joint graph's
            if name is not None:
                joint_name = node.name
                node._rename(name)
                node.target = node.name
                names[joint_name] = node.name
        gm.recompile()
        if kind == "forward":
            self._forward_names = names
        self.graphs[kind] = gm
        if self.directory is not None:
            self._dump(f"{kind}.py", gm.print_readable(print_output=False))
            self._dump("graphs.dot", to_dot([self]))

    def _dump(self, name: str, text: str) -> None:
        """Write one file of the dump; where that fails, warn and dump no more of this compile: a
        debugging aid that cannot be written must not stop training."""
        if self.directory is None:
            return
        try:
            (self.directory / name).write_text(text)
        except OSError as err:
            _warn_unwritable(self.directory.parent, err)
            self.directory = None

    def __str__(self) -> str:
        return format_table(self.rows)


def _node_label(node: fx.Node) -> str:
    """The node's name, and below it what it calls where that says more (not a placeholder's own name)."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return node.name if target == node.name else f"{node.name}\\n{target}"


def to_networkx(records: list[CompileRecord]) -> nx.DiGraph:
    """All recorded graphs as one ``networkx.DiGraph``; nodes ``"<compile>:<kind>:<name>"``."""
    g = nx.DiGraph()
    for i, record in enumerate(records):
        for kind, gm in record.graphs.items():
            prefix = f"{i}:{kind}:"
            for node in gm.graph.nodes:
                g.add_node(
                    prefix + node.name,
                    kind=kind,
                    op=node.op,
                    target=str(node.target),
                    name=node.name,
                    nmsparse=node_role(node),
                )
                for arg in node.all_input_nodes:
                    g.add_edge(prefix + arg.name, prefix + node.name)
    return g


def to_dot(records: list[CompileRecord]) -> str:
    """Graphviz DOT text of all recorded graphs, one cluster per graph, nmsparse nodes filled."""
    lines = ["digraph nmsparse {", "  node [shape=box, fontname=monospace];"]
    for i, record in enumerate(records):
        for kind, gm in record.graphs.items():
            lines.append(f'  subgraph "cluster_{i}_{kind}" {{')
            lines.append(f'    label="{kind} (compile {record.trace_id or i})";')
            for node in gm.graph.nodes:
                style = ", style=filled, fillcolor=lightblue" if node_role(node) is not None else ""
                lines.append(f'    "{i}:{kind}:{node.name}" [label="{_node_label(node)}"{style}];')
                for arg in node.all_input_nodes:
                    lines.append(f'    "{i}:{kind}:{arg.name}" -> "{i}:{kind}:{node.name}";')
            lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def untraced_rows(
    module: torch.nn.Module, seen: set[str], other_uses: Mapping[str, str], failed: Mapping[str, str] | None = None
) -> list[LayerRow]:
    """Rows for the weights (2-D and up) of ``module`` that no compiled graph used as a GEMM operand,
    with the reason: embeddings are lookups; else what used them in a graph (``other_uses``, by
    name: a recurrent layer dynamo traced under ``allow_rnn``); else why the compile of a graph
    holding them raised (``failed``, by name); else recurrent layers run eagerly, and so do modules
    with a backward hook, their own or a global one, and maybe the code calling them."""
    failed = failed or {}
    rows = []
    hooked = [name or "the model" for name, sub in module.named_modules() if _has_backward_hook(sub)]
    visited: set[int] = set()  # a tied parameter has one row, under its first name
    for mod_name, sub in module.named_modules():
        for pname, param in sub.named_parameters(recurse=False):
            name = f"{mod_name}.{pname}" if mod_name else pname
            if id(param) in visited:
                continue
            visited.add(id(param))
            lazy = is_lazy(param)  # a lazy module's parameter before its first forward: no shape yet
            if name in seen or (pname == "bias" if lazy else param.dim() < 2):
                continue
            seen.add(name)
            if lazy:
                reason = "uninitialized (a lazy module not run yet): its first forward gives it a shape"
            elif isinstance(sub, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                reason = "embedding lookup, not a GEMM"
            elif name in other_uses:
                reason = other_uses[name]
            elif name in failed:
                reason = failed[name]
            elif isinstance(sub, torch.nn.RNNBase):
                reason = (f"{type(sub).__name__}: dynamo does not trace recurrent layers into a graph "
                          "(torch._dynamo.config.allow_rnn), so it runs eagerly and dense")  # fmt: skip
            elif _has_backward_hook(sub):
                reason = "its module has a backward hook: dynamo (torch 2.13) does not trace it; it runs eagerly, dense"
            elif global_backward_hook():
                reason = (
                    "a global module backward hook (register_module_full_backward_hook): dynamo (torch 2.13) "
                    "does not trace the modules it hooks; they run eagerly, dense"
                )
            else:
                reason = "not a GEMM operand in any compiled graph (or in code dynamo did not trace)"
                if hooked:
                    reason += (
                        f"; a backward hook (on {', '.join(hooked)}) can keep dynamo out of the code calling its module"
                    )
            flops = {"forward": None, "input_grad": None, "weight_grad": None}
            matrix = None if lazy else (param.shape[0], math.prod(param.shape[1:]))  # a conv's GEMM: O × the rest
            rows.append(LayerRow(name, type(sub).__name__, matrix, None, "", "-", False, "-", reason, flops))
    return rows


def failure_reason(exc: Exception) -> str:
    """The report's reason for a weight whose graph did not compile: the exception's first line."""
    first = (str(exc).strip().splitlines() or [""])[0]
    first = first if len(first) <= 160 else first[:157] + "..."
    raised = f"{type(exc).__name__}: {first}"
    return f"the backend's compile of its graph raised {raised}; dynamo ran that code eagerly, dense"


def _has_backward_hook(module: torch.nn.Module) -> bool:
    """Whether ``module`` has a backward hook (``register_full_backward_hook`` and its pre-hook or
    legacy forms), which dynamo does not trace: the module runs eagerly."""
    return bool(module._backward_hooks or module._backward_pre_hooks)


def global_backward_hook() -> bool:
    """Whether a backward hook is registered for every module (``register_module_full_backward_hook``
    or its pre-hook form), which keeps dynamo out of the modules' calls as a module's own does."""
    from torch.nn.modules import module

    return bool(module._global_backward_hooks or module._global_backward_pre_hooks)


def _kept_attempts(records: list[CompileRecord]) -> list[CompileRecord]:
    """``records`` less those of an analysis dynamo restarted (a float attribute it turns into an
    input, say): it drops that attempt's graph, and the next attempt of the compile replaces it."""
    last = {r.compile_id: r.attempt for r in records if r.compile_id is not None}
    return [r for r in records if r.compile_id is None or r.attempt == last[r.compile_id]]


class Report:
    """What ``explain`` returns: ``str(report)`` is the table; graphs and exports as attributes."""

    def __init__(self, records: list[CompileRecord], untraced: list[LayerRow] | None = None) -> None:
        self.records = records
        self.untraced = untraced or []

    @property
    def rows(self) -> list[LayerRow]:
        """Every GEMM-like node of every compiled graph, then the weights no graph used as a GEMM weight."""
        return [row for record in self.records for row in record.rows] + self.untraced

    def _graph(self, kind: str) -> fx.GraphModule | None:
        return next((r.graphs[kind] for r in self.records if kind in r.graphs), None)

    @property
    def forward_graph(self) -> fx.GraphModule | None:
        """The rewritten forward graph after AOTAutograd (first graph if dynamo split the model)."""
        return self._graph("forward")

    @property
    def backward_graph(self) -> fx.GraphModule | None:
        """The rewritten backward graph after AOTAutograd (first graph if dynamo split the model)."""
        return self._graph("backward")

    @property
    def inference_graph(self) -> fx.GraphModule | None:
        """The rewritten graph AOTAutograd makes where no output needs a gradient (a frozen model:
        then there is no forward or backward graph)."""
        return self._graph("inference")

    def to_networkx(self) -> nx.DiGraph:
        """The recorded graphs as one ``networkx.DiGraph``, for queries over nodes and edges."""
        return to_networkx(self.records)

    def to_dot(self) -> str:
        """The recorded graphs as Graphviz DOT text, the nmsparse nodes filled, to render."""
        return to_dot(self.records)

    def __str__(self) -> str:
        parts = [str(r) for r in self.records] or ["(no graph compiled)"]
        if self.untraced:
            parts.append("weights no compiled graph uses as a GEMM weight:\n" + format_table(self.untraced))
        return "\n\n".join(parts)

    __repr__ = __str__


def explain(
    model: torch.nn.Module, *example_inputs: Any, kwargs: Mapping[str, Any] | None = None, **options: Any
) -> Report:
    """Compile ``model`` on the side with ``options`` and report what the backend would rewrite.

    Runs one forward, ``model(*example_inputs, **kwargs)`` (keyword inputs go in ``kwargs``, as in
    ``torch.export``, since other keywords are options), and one backward (``torch.autograd.grad``, so no
    ``.grad`` is touched) with a private copy of the layer states (the report shows the user's
    current step, N and decay factor); buffers and the random generators (dropout draws from them)
    are restored afterwards, so the user's model, states, optimizer and later steps see nothing.
    """
    from nmcompile.backend import NMSparseBackend
    from nmcompile.state import DEFAULT_REGISTRY, StateRegistry, unwrap

    config = SparsityConfig.from_options(options)
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"nmcompile.explain: kwargs= takes the forward's keyword inputs as a mapping, got {kwargs!r}")
    module = unwrap(model)
    records: list[CompileRecord] = []
    registry = StateRegistry()  # private, starting from the user's current states
    registry.share_lookup_tables(DEFAULT_REGISTRY)
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            entry = DEFAULT_REGISTRY.checkpoint_entry(sub, name, param)
            if entry is not None:
                registry.hold(sub, name, entry)
    saved = {name: b.detach().clone() for name, b in module.named_buffers()}
    # Its own recompile region (torch 2.13): each call's compile would otherwise count against the
    # recompile limit of the user's compiled model, which then falls back to dense eager.
    isolate = {"isolate_recompiles": True}
    if "isolate_recompiles" not in inspect.signature(torch.compile).parameters:  # older torch (the GPU image's 2.11)
        isolate = {}
    # A module compiled in place (``module.compile()``) is compiled the same way here: calling it
    # would take the user's compiled call, and dynamo traces the two ways differently.
    target = module._call_impl if module._compiled_call_impl is not None else module
    names = {id(p): name for name, p in module.named_parameters()}  # a tied weight: its first name, as the rows
    failed: dict[str, str] = {}

    def on_failure(gm: fx.GraphModule, operands: Sequence[Any], exc: Exception) -> None:
        for t in operands:
            if id(t) in names:
                failed.setdefault(names[id(t)], failure_reason(exc))

    backend = NMSparseBackend(config, registry, records.append, on_failure)
    compiled = torch.compile(target, backend=backend, **isolate)
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    # The default stance: under another one dynamo ran the user's compiled graph in place of this
    # compile (its real states stepped), or nothing compiled, or the compile raised.
    try:
        with torch.random.fork_rng(devices=cuda), torch.enable_grad(), torch.compiler.set_stance("default"):
            out = compiled(*example_inputs, **(kwargs or {}))
            outputs = [
                t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad
            ]
            params = [p for p in module.parameters() if p.requires_grad and not is_lazy(p)]
            if outputs and params:
                torch.autograd.grad(outputs, params, [torch.ones_like(t) for t in outputs], allow_unused=True)
    finally:
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                if name in saved:
                    buffer.copy_(saved[name])
    records = _kept_attempts(records)
    seen = {row.name for record in records for row in record.rows}
    other_uses = {name: why for record in records for name, why in record.other_uses.items()}
    rows = untraced_rows(module, seen, other_uses, failed)
    if not records and target is not module and type(module).forward.__module__.startswith("torch.nn."):
        why = IN_PLACE_NOTE.format(type(module).__name__)
        rows = [dataclasses.replace(row, reason=why) for row in rows]
    return Report(records, rows)
