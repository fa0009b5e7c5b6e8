"""Deployment helpers: what builds and launches jobs (recipe, checks, simulator and POC runs, site configuration,
job templates).  Nothing here runs inside FLARE; the runtime components are in :mod:`flare_duallora.flare`."""
