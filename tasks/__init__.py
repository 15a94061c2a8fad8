"""One module per pipeline stage: `run(params, paths) -> dict`, runnable as `python -m tasks.<stage>`."""
