"""The GPU's own cuSPARSELt compression of known 2:4 operands, saved for study on a CPU.

On an H200 (torch 2.11.0+cu130, 2026-12-04) cuSPARSELt did not read ``compress24``'s buffer in
PyTorch's sm8x layout, so the ops compress with ``torch._cslt_compress`` there. This saves, per
shape and dtype, a few random 2:4 operands (``sparse24.random_24``) and one whose every group keeps
the same two places, with the library's buffers (``[R, S]``, read as int16), so that
``benchmarks.cslt_layout`` can say on a CPU which of ``compress24``'s layouts (sm8x, sm90) the GPU
reads, or else where each value and metadata word sits.
Usage: python -m benchmarks.cslt_dump OUT.pt (a GPU with cuSPARSELt)
"""

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.common import check_writable
from nmcompile.kernels.sparse24 import random_24

SHAPES = ((128, 128), (128, 256), (256, 128), (256, 512), (384, 256))
SEEDS = (0, 1, 2)


def fixed_places(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A 2:4 operand keeping places 1 and 2 of every group, each kept value its own small integer."""
    values = torch.arange(1, rows * cols // 2 + 1, dtype=torch.float32).remainder_(251).add_(1)
    dense = torch.zeros(rows, cols // 4, 4)
    dense[..., 1:3] = values.view(rows, cols // 4, 2)
    return dense.view(rows, cols).to(dtype)


def payload(operands: dict, device: str) -> dict:
    """What the dump file holds: plain strings beside the operands, so ``torch.load``'s default
    ``weights_only=True`` reads it (``torch.__version__`` itself is a ``TorchVersion`` it refuses)."""
    return {"torch": str(torch.__version__), "device": device, "operands": operands}


def main() -> None:
    """Compresses each operand on the GPU and saves ``{(rows, cols, dtype name, seed or 'fixed'): (dense, buffer)}``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cslt_dump", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, metavar="OUT.pt", help="where to save the operands and buffers")
    out = parser.parse_args().out
    if not torch.cuda.is_available():
        sys.exit("python -m benchmarks.cslt_dump needs CUDA and cuSPARSELt")
    check_writable(parser, "OUT.pt", out)
    saved = {}
    for (rows, cols), dtype in ((s, d) for s in SHAPES for d in (torch.float16, torch.bfloat16)):
        operands = {seed: random_24(rows, cols, dtype, "cuda", seed=seed) for seed in SEEDS}
        operands["fixed"] = fixed_places(rows, cols, dtype).cuda()
        for key, dense in operands.items():
            buffer = torch._cslt_compress(dense)
            saved[rows, cols, str(dtype).removeprefix("torch."), key] = (dense.cpu(), buffer.view(torch.int16).cpu())
    torch.save(payload(saved, torch.cuda.get_device_name()), out)
    print(f"saved {len(saved)} operands and their cuSPARSELt buffers to {out}")


if __name__ == "__main__":
    main()
