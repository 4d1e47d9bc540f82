"""The stages of a round, each in the same shape: which jobs it has (from the store and the
config), the worker function that runs them (:mod:`matdisc.jobs`, through an executor), and how
each result is recorded as it completes. :mod:`matdisc.round` strings them together."""
