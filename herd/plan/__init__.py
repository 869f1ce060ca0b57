"""Planning on recorded or synthetic traffic: herd's router state driven on a virtual fleet.

:mod:`herd.plan.replay` feeds a trace through the router's own registry, queue book, latency
history, affinity table and the pure scorer, against :mod:`herd.sim.virtual` nodes on Trio's
clock. It sits above both the router state and the simulator, and below nothing: the bench,
the tests and the what-if planner use it.
"""
