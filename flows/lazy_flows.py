"""Prefect flows made on first access, so that importing a flow module imports neither Prefect
nor the stages (the CLI imports such modules for their commands).

`lazy_flows` gives a module the pair it needs: ``flows()``, the module's flows made once (after
`trecflow.settings.ensure_home`, before Prefect opens its database), and a module-level
``__getattr__`` that answers each flow's name with its flow.
"""

from __future__ import annotations

import functools
from typing import Any, Callable


def lazy_flows(module: str, specs: dict[str, tuple[Callable[..., Any], Callable[..., str]]]
               ) -> tuple[Callable[[], dict[str, Any]], Callable[[str], Any]]:
    """``(flows, __getattr__)`` for ``module``: ``specs`` maps each flow's name to its function and
    its flow-run-name function."""

    @functools.cache
    def flows() -> dict[str, Any]:
        from trecflow.settings import ensure_home

        ensure_home()
        from prefect import flow

        return {name: flow(name=name, flow_run_name=run_name)(function) for name, (function, run_name) in specs.items()}

    def module_getattr(name: str) -> Any:
        if name in specs:
            return flows()[name]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return flows, module_getattr
