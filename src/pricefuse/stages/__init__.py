"""Pipeline stages: thin glue that reads params, calls one library function, writes outputs and
records a run.

`STAGES` is the one list of stages, in pipeline order: the CLI makes a subcommand of each, and
tests check that dvc.yaml, MLproject and the member registry agree with it. A stage's name is
its module's name here (`pricefuse.stages.<stage>`), so no stage spells it twice.
"""

STAGES: tuple[str, ...] = (
    "fetch_images",
    "preprocess",
    "embed",
    "neighbours",
    "train_linear",
    "train_fusion",
    "train_gbdt",
    "train_text",
    "ensemble",
    "ablation",
    "submit",
)
