"""A simulated Ollama server for tests, ``herd demo`` and benchmarks. See :mod:`herd.sim.server`."""

from herd.sim.server import (
    FAILURE_MODES,
    PROBE_FAILURE_MODES,
    PULL_FAILURE_MODES,
    SimConfig,
    SimModel,
    SimOllama,
    run_sim,
)

__all__ = [
    "FAILURE_MODES",
    "PROBE_FAILURE_MODES",
    "PULL_FAILURE_MODES",
    "SimConfig",
    "SimModel",
    "SimOllama",
    "run_sim",
]
