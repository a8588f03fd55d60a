"""``nmcompile.passes`` from a source checkout: its ``passes/`` sits beside the package, not in it.
The editable install and the wheel map it there themselves, but a checkout on ``PYTHONPATH``, or
one that shadows an install (``python -m`` puts the current directory first), has no such map, or
the map of another tree; so a checkout's package always takes its own ``passes/``."""

import importlib.util
import sys
from pathlib import Path


def passes_beside_the_package() -> None:
    """Load the checkout's ``passes/`` as ``nmcompile.passes`` (nothing where the package has none beside it)."""
    package = Path(__file__).resolve().parent
    source = package.parent / "passes" / "__init__.py"
    if "nmcompile.passes" in sys.modules or (package / "passes").is_dir() or not source.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "nmcompile.passes", source, submodule_search_locations=[str(source.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    sys.modules["nmcompile"].passes = module  # as the import system binds a submodule on its package


passes_beside_the_package()
