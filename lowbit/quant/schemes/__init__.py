"""The registry of PTQ schemes: every module in this package, imported here and nowhere else.

    from lowbit.quant.schemes import SCHEMES, FORMATS
    SCHEMES["int8_dynamic"].build(ctx)     # -> ["ptq_int8_dynamic"]

A new scheme is one module here defining `SCHEMES` (lowbit.quant.scheme.Scheme: name,
builder, variant names, report order) and `FORMATS` ({storage format: loader} for what it
writes), plus its test: params.yaml validation, the ptq stage, the loaders and the report
order all read this registry.
"""

from __future__ import annotations

import importlib
import pkgutil

from lowbit.quant.scheme import Scheme


def _collect() -> tuple[dict[str, Scheme], dict]:
    schemes: dict[str, Scheme] = {}
    formats: dict = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for scheme in module.SCHEMES:
            if scheme.name in schemes:
                raise ValueError(f"scheme {scheme.name!r} is defined twice (lowbit/quant/schemes/{info.name}.py)")
            schemes[scheme.name] = scheme
        for name, loader in module.FORMATS.items():
            if name in formats:
                raise ValueError(f"storage format {name!r} is defined twice (lowbit/quant/schemes/{info.name}.py)")
            formats[name] = loader
    return dict(sorted(schemes.items(), key=lambda item: item[1].order)), formats


SCHEMES, FORMATS = _collect()
