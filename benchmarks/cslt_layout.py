"""Where a GPU's cuSPARSELt puts each kept value and metadata word, read from ``cslt_dump``'s file.

``TRITON_INTERPRET=1 python -m benchmarks.cslt_layout DUMP.pt [--save MAP.pt]``, on a CPU. For
each dumped shape and dtype, the random operands (several seeds) give every value slot and every
metadata word a tuple of bit patterns, one per seed, that is nearly always unique in fp16 (bf16
has fewer patterns, so some stay ambiguous); matching the tuples found in the library's buffer
against the operands' own locates each slot and word in the buffer. A value slot is ``(r, j)``:
the ``j``-th kept entry of row ``r`` (two per group of four, in column order); a metadata word is
``(r, w)``: the 4-bit codes (``idx0 | idx1 << 2``) of row ``r``'s groups ``4w .. 4w + 3``, the
first in the low bits. Prints, per shape, how many positions matched, whether the values are
row-major, which of ``compress24``'s cuSPARSELt layouts (PyTorch's sm8x one, torchao's sm90 one)
writes the library's buffers bit for bit, and where the operand that keeps places 1 and 2
everywhere has its (all equal) words; a layout whose words mix codes of several rows, as sm90's
does, matches no word. ``--save`` writes the maps (buffer position -> slot or word index, -1
where unmatched) for working out a closed form.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch

from benchmarks.common import check_writable
from nmcompile.kernels.compress24 import compressed_numel


def slots(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2:4 ``[R, C]`` operand with exactly two nonzeros per group: its kept values ``[R, C/2]``
    (int16 bits) and metadata words ``[R, C/16]`` (int64, 16 bits used)."""
    rows, cols = dense.shape
    groups = dense.view(rows, cols // 4, 4)
    kept = groups != 0
    if not torch.equal(kept.sum(-1), torch.full((rows, cols // 4), 2)):
        raise ValueError("each group of four must hold exactly two nonzeros")
    places = torch.arange(4).expand_as(kept).masked_select(kept).view(rows, cols // 4, 2)
    values = groups.masked_select(kept).view(rows, cols // 2).contiguous().view(torch.int16)
    code = places[..., 0] | (places[..., 1] << 2)
    words = (code.view(rows, cols // 16, 4) << (4 * torch.arange(4))).sum(-1)
    return values, words


def locate(found: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """For each row of ``found`` (a position's bit patterns across seeds), the index of the row of
    ``own`` with the same patterns, or -1 where none or several do."""
    index: dict[tuple[int, ...], int] = {}
    for i, key in enumerate(map(tuple, own.tolist())):
        index[key] = -1 if key in index else i
    return torch.tensor([index.get(key, -1) for key in map(tuple, found.tolist())], dtype=torch.long)


def layout_map(dense: list[torch.Tensor], buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The maps of one shape from its seeds' operands and library buffers: ``values`` (each value
    position of the buffer -> slot ``r * C/2 + j``) and ``meta`` (each 16-bit word after the
    values -> word ``r * C/16 + w``), -1 where unmatched."""
    rows, cols = dense[0].shape
    own_values, own_words = zip(*(slots(d) for d in dense), strict=True)
    flat = [b.reshape(-1).view(torch.int16) for b in buffers]
    half = rows * cols // 2
    values = locate(
        torch.stack([f[:half] for f in flat], 1).long(), torch.stack([v.reshape(-1) for v in own_values], 1).long()
    )
    end = compressed_numel(rows, cols)
    meta = locate(
        torch.stack([f[half:end].long() & 0xFFFF for f in flat], 1), torch.stack([w.reshape(-1) for w in own_words], 1)
    )
    return {"values": values, "meta": meta}


def same_as_compress24(dense: list[torch.Tensor], buffers: list[torch.Tensor]) -> dict[str, bool]:
    """Per cuSPARSELt layout of ``compress24`` (run on a CPU under ``TRITON_INTERPRET=1``), whether its
    values and metadata are the library's, bit for bit, for every operand (shapes of multiples of 128)."""
    from nmcompile.kernels.compress24 import LAYOUTS, compress24

    rows, cols = dense[0].shape
    end = compressed_numel(rows, cols)
    return {
        layout: rows % 128 == 0
        and cols % 128 == 0
        and all(
            torch.equal(compress24(d, layout)[0].reshape(-1).view(torch.int16)[:end], b.reshape(-1)[:end])
            for d, b in zip(dense, buffers, strict=True)
        )
        for layout in LAYOUTS[1:]
    }


def report(dump: dict) -> dict[tuple, dict[str, torch.Tensor]]:
    """Prints one line per shape and dtype of the dump and returns the maps."""
    by_shape: dict[tuple, list] = {}
    print(f"cuSPARSELt buffers from {dump['device']}, torch {dump['torch']}")
    for (rows, cols, dtype, seed), (dense, buffer) in dump["operands"].items():
        if seed != "fixed":
            by_shape.setdefault((rows, cols, dtype), []).append((dense, buffer))
            continue
        words = buffer.reshape(-1)[rows * cols // 2 :].long() & 0xFFFF
        uniform = (words == slots(dense)[1][0, 0]).nonzero().view(-1)  # every group keeps places 1 and 2
        print(
            f"[{rows}, {cols}] {dtype}, places 1 and 2 kept: {uniform.numel()} words of that code after the values"
            f" ({rows * cols // 16} expected), at offsets {uniform.min()} to {uniform.max()} past them"
            if uniform.numel()
            else f"[{rows}, {cols}] {dtype}, places 1 and 2 kept: no word of that code after the values"
        )
    maps = {}
    for (rows, cols, dtype), pairs in sorted(by_shape.items()):
        dense, buffers = [d for d, _ in pairs], [b for _, b in pairs]
        found = layout_map(dense, buffers)
        half = rows * cols // 2
        row_major = torch.equal(found["values"], torch.arange(half))
        same = same_as_compress24(dense, buffers)
        print(
            f"[{rows}, {cols}] {dtype}: values matched {(found['values'] >= 0).sum()}/{half}"
            f" (row-major: {row_major}); words matched {(found['meta'] >= 0).sum()}/{rows * cols // 16};"
            f" the buffers are compress24's in {', '.join(k for k, v in same.items() if v) or 'no layout'}"
        )
        maps[rows, cols, dtype] = found
    return maps


def main() -> None:
    """Reads the dump, prints the report and saves the maps where asked."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cslt_layout", description=__doc__.split("\n\n")[0])
    parser.add_argument("dump")
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()
    if not Path(args.dump).is_file():
        parser.error(f"{args.dump}: no such file (the cslt_dump output to read)")
    if args.save is not None:
        check_writable(parser, "--save", args.save)
    try:
        dump = torch.load(args.dump)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        parser.error(f"{args.dump}: not a cslt_dump output (torch.load: {str(err).split('.')[0]})")
    maps = report(dump)
    if args.save:
        torch.save(maps, args.save)


if __name__ == "__main__":
    main()
