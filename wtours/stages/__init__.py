"""The training stages, each a set of hooks on :func:`wtours.train.engine.run_stage`."""
