"""``nmcompile.passes`` from a source checkout that no install maps: the checkout on ``PYTHONPATH``,
or one that shadows a ``pip install .`` (``python -m`` puts the current directory first). The
editable install and the wheel map ``passes/`` to ``nmcompile.passes`` themselves."""

import importlib.util
import sys
from pathlib import Path


def passes_beside_the_package() -> None:
    """Load the checkout's ``passes/`` as ``nmcompile.passes`` where nothing else provides it."""
    source = Path(__file__).resolve().parent.parent / "passes" / "__init__.py"
    if "nmcompile.passes" in sys.modules or not source.is_file() or importlib.util.find_spec("nmcompile.passes"):
        return
    spec = importlib.util.spec_from_file_location(
        "nmcompile.passes", source, submodule_search_locations=[str(source.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    sys.modules["nmcompile"].passes = module  # as the import system binds a submodule on its package


passes_beside_the_package()
