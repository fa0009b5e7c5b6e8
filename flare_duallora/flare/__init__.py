"""FLARE runtime components, a thin shell around the adapter engine: what runs inside FLARE (executor, filter,
aggregator, controller, audit) and the names of the files a run leaves (:mod:`.run_files`)."""
