"""What the Triton kernels compile to on a GPU target, without a GPU.

``python -m benchmarks.ptx [--arch 90]``: compiles every autotune config of every Triton kernel
(MVUE, masked operands, 2:4 compression, column gather, SR-STE, mask, permutation scores, and the
fused GEMM kernels, which rank and prune inside their tiles) for ``sm_<arch>`` (Triton's own
compiler and ptxas, no device needed) with the arguments a training step passes (bf16, strides
that are multiples of 16, the contiguous dim's stride 1, as Triton specializes them at launch),
and counts in the PTX what moves data between threads (warp shuffles, barriers, shared-memory
stores, per program; shuffles also per tile entry a thread owns) and the width of its global loads
and stores; in the machine code (``cuobjdump`` and ``nvdisasm`` on the cubin), the registers per
thread, the local-memory stores (``STL``: spilled registers, or an array the compiler put in local
memory) and the instructions, also per tile entry a thread owns (for the kernels without a loop; the GEMM
kernels loop, so theirs is code size). The elementwise kernels are memory-bound passes, so data
exchanged between threads, narrow accesses, spills and instructions are what keep them from
bandwidth. A count, not a time: ``benchmarks.parts24`` times the kernels on a GPU.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import importlib
import itertools
import math
import os
import re
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import triton.language as tl


@dataclass(frozen=True)
class Variant:
    """One kernel as a step launches it: pointer element types, constexpr flags, the strides of the
    contiguous dims (1 at launch, so Triton compiles them as constants), the tile's config keys,
    and the types of scalar arguments other than int32."""

    name: str
    module: str
    kernel: str
    pointers: dict[str, str]
    flags: dict[str, Any]
    unit_strides: tuple[str, ...]
    tile: tuple[str, ...]
    entries_per_tile: int = 1
    scalars: tuple[tuple[str, str], ...] = ()


MVUE_POINTERS = {"g_ptr": "bf16", "out_ptr": "bf16", "meta_ptr": "bf16"}  # meta_ptr: out_ptr again, unused
OPERAND_POINTERS = {
    "w_ptr": "bf16",
    "perm_ptr": "i64",
    "f_ptr": "bf16",
    "alpha_ptr": "fp32",
    "out_ptr": "bf16",
    "meta_ptr": "bf16",
}
OPERAND_FLAGS = {
    "n": 2,
    "M": 4,
    "LOAD_MASK": False,
    "HAS_ALPHA": False,
    "COMPRESS": 0,
    "TRANSPOSED": False,
    "WIDE": False,
}
# The COMPRESS flag of the cuSPARSELt layouts (1 + compress24.LAYOUTS.index(layout); CUTLASS is 1)
CUSPARSELT_CODES = (("cuSPARSELt", 2), ("cuSPARSELt sm90", 3))
VARIANTS = (
    Variant("mvue24", "mvue", "mvue_kernel", MVUE_POINTERS, {"RULE": 2, "MM": 4, "TRANSPOSE": False, "COMPRESS": 0,
            "WIDE": False}, ("stride_go", "stride_oo"), ("BLOCK_G", "BLOCK_O"), 4),
    Variant("mvue24, transposed", "mvue", "mvue_kernel", MVUE_POINTERS, {"RULE": 2, "MM": 4, "TRANSPOSE": True,
            "COMPRESS": 0, "WIDE": False}, ("stride_go", "stride_ot"), ("BLOCK_G", "BLOCK_O"), 4),
    *(Variant(f"mvue24, compressed ({library})", "mvue", "mvue_kernel", {**MVUE_POINTERS, "meta_ptr": "i16"},
              {"RULE": 2, "MM": 4, "TRANSPOSE": True, "COMPRESS": code, "WIDE": False}, ("stride_go", "stride_ot"),
              ("BLOCK_G", "BLOCK_O"), 4)
      for library, code in CUSPARSELT_CODES),
    Variant("fused weight grad, mvue24", "weight_grad", "weight_grad_kernel",
            {"dy_ptr": "bf16", "x_ptr": "bf16", "w_ptr": "bf16", "f_ptr": "bf16", "dw_ptr": "bf16"},
            {"n": 2, "M": 4, "RULE": 2, "MM": 4, "SRSTE": True, "LOAD_MASK": False, "DOT": tl.bfloat16,
             "PRECISION": "ieee", "WIDE": False}, ("stride_do", "stride_xk", "stride_wk", "stride_fk", "stride_gk"),
            ("BLOCK_O", "BLOCK_T")),
    Variant("W ⊙ F", "operand24", "masked_operand_kernel", OPERAND_POINTERS,
            {**OPERAND_FLAGS, "PERMUTE": False, "SCATTER": False}, ("stride_wk", "stride_fk", "stride_ok"),
            ("BLOCK_O", "BLOCK_K")),
    Variant("W ⊙ B (Bi-Mask)", "operand24", "masked_operand_kernel", OPERAND_POINTERS,
            {**OPERAND_FLAGS, "PERMUTE": True, "SCATTER": True}, ("stride_wk", "stride_fk", "stride_ok"),
            ("BLOCK_O", "BLOCK_K")),
    *(Variant(f"{operand}, compressed ({library})", "operand24", "masked_operand_kernel",
              {**OPERAND_POINTERS, "meta_ptr": "i16"},
              {**OPERAND_FLAGS, "PERMUTE": backward, "SCATTER": False, "COMPRESS": code, "TRANSPOSED": backward},
              ("stride_wk", "stride_fk", "stride_ok"), ("BLOCK_O", "BLOCK_K"))
      for library, code in CUSPARSELT_CODES for operand, backward in (("W ⊙ F", False), ("(W[P] ⊙ Bp)ᵀ", True))),
    *(Variant(f"compress24, {library}", "compress24", "compress24_kernel",
              {"a_ptr": "bf16", "values_ptr": "bf16", "meta_ptr": "i16"}, {"LAYOUT": code - 1, "WIDE": False},
              ("stride_ac",), ("BLOCK_R", "BLOCK_C"))
      for library, code in (*CUSPARSELT_CODES, ("CUTLASS", 1))),
    Variant("gather_t (dY[:, P]ᵀ)", "gather_t", "gather_t_kernel",
            {"a_ptr": "bf16", "row_of_ptr": "i64", "out_ptr": "bf16"}, {"WIDE": False}, ("stride_ao",),
            ("BLOCK_T", "BLOCK_O")),
    Variant("SR-STE weight grad", "srste", "srste_kernel",
            {"g_ptr": "bf16", "w_ptr": "bf16", "f_ptr": "bf16", "out_ptr": "bf16"},
            {"n": 2, "M": 4, "LOAD_MASK": False, "WIDE": False},
            ("stride_gk", "stride_wk", "stride_fk", "stride_ok"), ("BLOCK_O", "BLOCK_K"), scalars=(("lam", "fp32"),)),
    Variant("nm_mask", "nm_mask", "nm_mask_kernel", {"a_ptr": "bf16", "out_ptr": "i8"}, {"n": 2, "M": 4, "WIDE": False},
            ("stride_ac", "stride_oc"), ("BLOCK_R", "BLOCK_C")),
    Variant("permutation scores", "perm_score", "perm_score_kernel",
            {"f_ptr": "i8", "perm_ptr": "i64", "score_ptr": "i32"}, {"M": 4}, ("stride_fc",), ("BLOCK_B", "BLOCK_C"),
            4),
    Variant("fused forward", "sparse_forward", "sparse_forward_kernel",
            {"x_ptr": "bf16", "w_ptr": "bf16", "b_ptr": "bf16", "f_ptr": "bf16", "alpha_ptr": "fp32", "y_ptr": "bf16"},
            {"n": 2, "M": 4, "HAS_BIAS": True, "LOAD_MASK": False, "HAS_ALPHA": False, "DOT": tl.bfloat16,
             "PRECISION": "ieee", "WIDE": False}, ("stride_xk", "stride_wk", "stride_fk", "stride_yo"),
            ("BLOCK_T", "BLOCK_O")),
    Variant("fused input grad, Bi-Mask", "input_grad", "input_grad_kernel",
            {"dy_ptr": "bf16", "w_ptr": "bf16", "perm_ptr": "i64", "f_ptr": "bf16", "alpha_ptr": "fp32",
             "dx_ptr": "bf16"}, {"n": 2, "M": 4, "PERMUTE": True, "LOAD_MASK": False, "HAS_ALPHA": False,
            "DOT": tl.bfloat16, "PRECISION": "ieee", "WIDE": False}, ("stride_do", "stride_wk", "stride_fk",
            "stride_xk"), ("BLOCK_T", "BLOCK_K")),
)  # fmt: skip


@dataclass(frozen=True)
class Counts:
    """PTX instruction counts of one compiled config: each thread runs each instruction once (no loops)."""

    variant: str
    config: str
    entries: int
    threads: int
    shuffles: int
    barriers: int
    shared_stores: int
    load_bits: int
    store_bits: int
    registers: int
    local_stores: int
    instructions: int

    @property
    def shuffles_per_entry(self) -> float:
        """Warp shuffles a thread runs per tile entry it owns."""
        return self.shuffles * self.threads / self.entries

    @property
    def instructions_per_entry(self) -> float:
        """Machine instructions a thread runs per tile entry it owns (the kernels without a loop)."""
        return self.instructions * self.threads / self.entries


def _count(ptx: str, pattern: str) -> int:
    return len(re.findall(pattern, ptx))


def _widest(ptx: str, op: str) -> int:
    """The widest global load (``op="ld"``) or store (``"st"``) of the kernel, in bits (``.v4.b32``: 128)."""
    widths = []
    for instruction in re.findall(rf"{op}\.global\S*", ptx):
        vector, bits = re.search(r"\.v(\d)\.", instruction), re.search(r"\.[bfsu](\d+)$", instruction)
        widths.append((int(vector.group(1)) if vector else 1) * (int(bits.group(1)) if bits else 0))
    return max(widths, default=0)


def _code(cubin: bytes) -> bytes:
    """The code sections (``.text.<function>``) of an ELF64 cubin, one after another."""
    (table_at,) = struct.unpack_from("<Q", cubin, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", cubin, table_at + i * entry_size) for i in range(count)]
    names = sections[names_index][4]

    def name(at: int) -> bytes:
        return cubin[names + at : cubin.index(b"\0", names + at)]

    return b"".join(cubin[at : at + size] for label, *_, at, size in sections if name(label).startswith(b".text."))


def machine_code(cubins: list[bytes], target: str) -> list[tuple[int, int, int]]:
    """Registers per thread, local-memory stores (``STL`` instructions: spills) and machine
    instructions (``NOP`` padding left out) of kernels compiled for ``target`` (``"sm_90a"``), read
    with the ``cuobjdump`` and ``nvdisasm`` that ship with Triton: the code of all of them in one
    ``nvdisasm`` run (a run takes 0.6 s to start, most of what a kernel took alone)."""
    from triton import knobs

    cuobjdump = Path(knobs.nvidia.cuobjdump.path)
    registers = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "kernel.cubin")
        for cubin in cubins:
            path.write_bytes(cubin)
            usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
            registers.append(int(re.search(r"REG:(\d+)", usage).group(1)))
        codes = [_code(cubin) for cubin in cubins]
        path.write_bytes(b"".join(codes))
        arch = "SM" + target.removeprefix("sm_")
        command = [cuobjdump.with_name("nvdisasm"), "--binary", arch, path]
        sass = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    ends = list(itertools.accumulate(map(len, codes)))  # a kernel's code ends where the next one's starts
    opcodes: list[list[str]] = [[] for _ in cubins]
    for at, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass):
        opcodes[bisect.bisect_right(ends, int(at, 16))].append(op)
    return [
        (count, ops.count("STL") + sum(op.startswith("STL.") for op in ops), sum(op != "NOP" for op in ops))
        for count, ops in zip(registers, opcodes, strict=True)
    ]


def _compile(variant: Variant, arch: int) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """``variant`` compiled for ``sm_<arch>`` once per autotune config: the PTX half of its
    ``Counts``, and what Triton compiled (``ptx``, ``cubin``, ...)."""
    import triton
    from triton.backends.compiler import GPUTarget

    autotuned = getattr(importlib.import_module(f"nmcompile.kernels.{variant.module}"), variant.kernel)
    fn = autotuned.fn
    configs = autotuned.configs
    if autotuned.early_config_prune:  # the configs a launch with these flags would try
        configs = autotuned.early_config_prune(configs, {}, **variant.flags)
    for config in configs:
        constants = {**variant.flags, **config.kwargs, **dict.fromkeys(variant.unit_strides, 1)}
        scalars = dict(variant.scalars)
        signature = {
            p.name: "constexpr"
            if p.is_constexpr or p.name in constants
            else variant.pointers.get(p.name, scalars.get(p.name, "i32"))
            for p in fn.params
        }
        signature = {name: f"*{kind}" if name in variant.pointers else kind for name, kind in signature.items()}
        aligned = [
            name for name, kind in signature.items() if kind != "constexpr" and name not in ("n", "seed", *scalars)
        ]
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
        source = triton.compiler.ASTSource(fn, signature, constexprs=constants, attrs=attrs)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        asm = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm
        ptx = asm["ptx"]
        counts = (
            variant.name,
            " ".join(f"{k} {v}" for k, v in config.kwargs.items()) + f", {config.num_warps} warps",
            math.prod(config.kwargs[key] for key in variant.tile) * variant.entries_per_tile,
            32 * config.num_warps,
            _count(ptx, r"shfl\.sync"),
            _count(ptx, r"bar\.sync"),
            _count(ptx, r"st\.shared"),
            _widest(ptx, "ld"),
            _widest(ptx, "st"),
        )
        yield counts, asm


def compile_counts(variants: list[Variant], arch: int) -> list[Counts]:
    """Each of ``variants`` compiled for ``sm_<arch>`` once per autotune config."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("benchmarks.ptx compiles for a GPU: unset TRITON_INTERPRET (its kernels have one config)")
    compiled = [done for variant in variants for done in _compile(variant, arch)]
    if not compiled:
        return []
    target = re.search(r"^\.target\s+(sm_\w+)", compiled[0][1]["ptx"], re.MULTILINE).group(1)
    code = machine_code([asm["cubin"] for _, asm in compiled], target)
    return [Counts(*counts, *machine) for (counts, _), machine in zip(compiled, code, strict=True)]


def table(rows: list[Counts]) -> str:
    """Markdown table of ``rows``."""
    lines = [
        "| kernel | config | tile entries | shuffles | shuffles per entry | barriers | shared stores "
        "| widest load (bits) | widest store (bits) | registers | local stores | instructions "
        "| instructions per entry |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.variant} | {r.config} | {r.entries} | {r.shuffles} | {r.shuffles_per_entry:.1f} | {r.barriers} "
            f"| {r.shared_stores} | {r.load_bits} | {r.store_bits} | {r.registers} | {r.local_stores} "
            f"| {r.instructions} | {r.instructions_per_entry:.1f} |"
        )
    return "\n".join(lines)


ARCHS = (75, 80, 86, 89, 90, 100, 103, 120, 121)  # the targets Triton 3.9's ptxas and cuobjdump took here


def nm_pair(text: str) -> tuple[int, int]:
    """``"N:M"`` as the Triton kernels take it (``common.check_nm``), for ``--nm``."""
    from nmcompile.kernels.common import check_nm

    try:
        n, m = (int(part) for part in text.split(":"))
        check_nm(n, m)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected N:M with 1 <= N <= M, M a power of two in 2..32: {error}") from None
    return n, m


def main(argv: list[str] | None = None) -> list[Counts]:
    """Print the table for the chosen kernels."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ptx", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch", type=int, default=90, choices=ARCHS, metavar="ARCH",
        help=f"compute capability as one number, one of {', '.join(map(str, ARCHS))} (default 90)",
    )  # fmt: skip
    parser.add_argument("--kernel", choices=[v.name for v in VARIANTS], action="append", help="default: all")
    parser.add_argument(
        "--nm", type=nm_pair, default=(2, 4), metavar="N:M",
        help="the N:M the ranking kernels compile for (default 2:4); for another, the kernels that "
        "write 2:4-compressed operands are left out",
    )  # fmt: skip
    args = parser.parse_args(argv)
    n, m = args.nm
    asked = [v for v in VARIANTS if not args.kernel or v.name in args.kernel]
    left_out = [v.name for v in asked if (n, m) != (2, 4) and (v.flags.get("COMPRESS") or v.module == "compress24")]
    if left_out and len(left_out) == len(asked):
        parser.error(f"--nm {n}:{m}: {'; '.join(left_out)} write 2:4-compressed operands, at 2:4 only")
    chosen = [
        dataclasses.replace(v, flags={**v.flags, "n": n, "M": m}) if "n" in v.flags else v
        for v in asked
        if v.name not in left_out
    ]
    rows = compile_counts(chosen, args.arch)
    print(f"sm_{args.arch}, {n}:{m}, PTX of each autotune config\n\n{table(rows)}", flush=True)
    if left_out:
        print(f"\nleft out at {n}:{m} (they write 2:4-compressed operands): {'; '.join(left_out)}")
    return rows


if __name__ == "__main__":
    main()
