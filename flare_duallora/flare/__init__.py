"""FLARE components: a thin shell around the adapter engine (executor, filter, aggregator, workflow, job)."""
