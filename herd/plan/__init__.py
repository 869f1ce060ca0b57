"""Planning on recorded or synthetic traffic: herd's router state driven on a virtual fleet.

:mod:`herd.plan.replay` feeds a trace through the router's own registry, queue book, latency
history, affinity table and the pure scorer, against :mod:`herd.sim.virtual` nodes on Trio's
clock. It sits above both the router state and the simulator, and below nothing: the bench,
the tests and the what-if planner use it.

The what-if planner (:mod:`herd.plan.planner`, its entry point) is built of values-in,
values-out modules: :mod:`~herd.plan.inputs` (recorded requests, node facts, the errors),
:mod:`~herd.plan.trace` (requests to sessions), :mod:`~herd.plan.speeds` (rates learned per
node:model), :mod:`~herd.plan.changes` (presets, changes, the virtual fleet). Only
:mod:`~herd.plan.sources` reads anything: the trace store and the router's registry.
"""
