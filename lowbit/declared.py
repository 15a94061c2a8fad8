"""Registry names read from the source, without importing it.

    scheme_names()    # ["half_bf16", "half_fp16", "int8_weight_only", ...], in report order
    observer_names()  # ["minmax", "percentile", "mse", "entropy"]

params.yaml validation needs only the names of the PTQ schemes and observers, but importing
their registries imports torch, transformers and bitsandbytes: 7.6 of the 10.8 s a `lowbit run`
with nothing to do took. The names are the string literals where the registries declare them:
the first argument of each `Scheme("name", ..., order=N)` in lowbit/quant/schemes/ and the keys
of the OBSERVERS dict in lowbit/quant/observers.py. tests/unit/test_config.py checks both lists
against the imported registries, so a scheme declared another way fails a test, not a user.
"""

from __future__ import annotations

import ast
from pathlib import Path

QUANT = Path(__file__).parent / "quant"


def scheme_names() -> list[str]:
    declared: list[tuple[int, str]] = []
    for path in sorted((QUANT / "schemes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Scheme" and node.args:
                order = next((k.value.value for k in node.keywords if k.arg == "order"), 0)
                declared.append((order, node.args[0].value))
    return [name for _, name in sorted(declared, key=lambda item: item[0])]


def observer_names() -> list[str]:
    for node in ast.parse((QUANT / "observers.py").read_text()).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if getattr(target, "id", None) == "OBSERVERS" and isinstance(node.value, ast.Dict):
            return [key.value for key in node.value.keys]
    return []
