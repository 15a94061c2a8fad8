"""Where the pipeline's independent branches run: threads of the flow's process, or Dask workers.

    runner = RunnerChoice.from_params(params.runner, kind="dask")   # command-line values win over params
    pipeline.with_options(task_runner=task_runner(runner))

threads (the default): one stage at a time unless `parallel` says more. Each stage is a
process of its own anyway (forked from the stage host), so threads only wait on it; the flow's
process stays light.

dask: prefect-dask's DaskTaskRunner. With no address, a local cluster of worker processes is
started for the run and torn down after it; with `dask_address`, the tasks go to that running
scheduler, whose workers must see the project folder at the same path (a shared volume) and
have lowbit installed. Either way the DVC calls of concurrent stages queue on the project's
lock file (flows/dvc_stages.py), and MLflow is written by the flow's process only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from lowbit.config import RunnerParams
from lowbit.errors import LowbitError

if TYPE_CHECKING:  # Prefect's import takes seconds: the command line checks a choice without it
    from prefect.task_runners import TaskRunner

# Branches that can run at once (ptq, qat, lora, qlora): a local cluster needs no more workers.
CONCURRENT_BRANCHES = 4
# A scheduler that is up answers a connect in milliseconds; one that is not, never. Dask's own
# default is 30 s per try, with retries, before a bare OSError.
DASK_CONNECT_TIMEOUT_S = 10
ADDRESS_KEYS = "runner.dask_address in params.yaml (or --dask-address)"


@dataclass(frozen=True)
class RunnerChoice:
    kind: str = "threads"
    parallel: int = 0  # 0 = the runner's default
    dask_address: str = ""

    @classmethod
    def from_params(cls, section: RunnerParams, kind: str | None = None, parallel: int | None = None,
                    dask_address: str | None = None) -> "RunnerChoice":
        """params.yaml `runner`, with whatever the command line set on top. An address implies dask."""
        address = section.dask_address if dask_address is None else dask_address
        chosen = kind or ("dask" if dask_address else section.kind)
        if address and chosen != "dask":
            raise LowbitError(f"a Dask scheduler address ({address}) needs the dask runner: --runner dask, "
                              "or runner.kind: dask in params.yaml")
        if parallel is not None and parallel < 1:
            raise LowbitError(f"--parallel {parallel}: must be 1 or more")
        return cls(chosen, section.parallel if parallel is None else parallel, address)

    @property
    def workers(self) -> int:
        if self.parallel:
            return self.parallel
        # threads default to one stage at a time: concurrent training stages share cores and
        # distort each other's timings; asking for Dask is asking for the branches at once.
        return CONCURRENT_BRANCHES if self.kind == "dask" else 1

    def describe(self) -> str:
        if self.kind == "threads":
            return f"threads ({self.workers} at a time)"
        return f"dask scheduler {self.dask_address}" if self.dask_address else f"dask local cluster ({self.workers} worker processes)"


def task_runner(choice: RunnerChoice) -> TaskRunner:
    from prefect.task_runners import ThreadPoolTaskRunner

    if choice.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=choice.workers)
    # Dask's INFO lines (every worker registering, retiring) drown the stages' own output; read
    # at distributed's import, and inherited by the worker processes it spawns.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    import dask
    from prefect_dask import DaskTaskRunner  # imports distributed (~1 s): only when asked for

    # A nanny writes its pre-spawn variables (OMP_NUM_THREADS=1, ...) into the os.environ of the
    # process that starts the local cluster, for good: the flow's own stages (prepare, evaluate,
    # report) then ran single-threaded (evaluate took twice as long, its latency figures doubled).
    # The workers get their thread count from `env` below instead.
    dask.config.set({"distributed.nanny.pre-spawn-environ": {}})

    if choice.dask_address:
        check_scheduler_answers(choice.dask_address)
        return DaskTaskRunner(address=choice.dask_address)
    # One task thread per worker: a stage is a subprocess that uses the cores itself. No
    # dashboard: it needs bokeh and a free port, and nobody watches a weekly run's.
    threads = stage_threads(os.cpu_count() or 1, choice.workers)
    return DaskTaskRunner(cluster_kwargs={"n_workers": choice.workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None, "env": {"OMP_NUM_THREADS": str(threads)}})


def stage_threads(cores: int, concurrent_stages: int) -> int:
    """Torch threads for each stage when `concurrent_stages` share `cores`. Dask's nanny sets
    OMP_NUM_THREADS=1 in its workers (right for many small tasks), which the stage subprocesses
    inherit: a 16-core machine would train 4 stages on 4 cores. More threads than cores would
    make the stages wait on each other at every parallel region instead."""
    return max(1, cores // concurrent_stages)


def check_scheduler_answers(address: str, timeout_s: float = DASK_CONNECT_TIMEOUT_S) -> None:
    """Before the flow starts: a scheduler that does not answer is a config error, said in seconds."""
    from distributed import Client

    if "://" not in address or not urlparse(address).port:
        raise LowbitError(f"{ADDRESS_KEYS}: {address!r} is not a scheduler address; expected e.g. tcp://host:8786")
    try:
        Client(address, timeout=timeout_s).close()
    except (OSError, TimeoutError) as err:
        raise LowbitError(f"no Dask scheduler answered at {address} within {timeout_s:.0f} s ({type(err).__name__}). "
                          f"Start one (`dask scheduler`, then `dask worker {address}`), fix {ADDRESS_KEYS}, "
                          "or set runner.kind: threads") from None
