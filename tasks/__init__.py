"""Stage bodies: one module per pipeline stage, `run(params, paths) -> dict`, runnable as `python -m tasks.<stage>`.

STAGES is the registry of stages, in pipeline order: the command line, the flow and the tests
read it, and dvc.yaml has one stage of each name. The other modules here are what stages share.
"""

STAGES = ("prepare", "baseline", "ptq", "qat", "lora", "qlora", "evaluate", "report")
