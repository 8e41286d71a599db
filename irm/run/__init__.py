"""Running experiments: configs (:mod:`.config`), what a stage is (:mod:`.registry`), run directories
(:mod:`.rundir`), wandb tracking (:mod:`.tracking`, :mod:`.wandb_offline`), the report
(:mod:`.report`), and on top the pipeline that runs the stages (:mod:`.pipeline`) and its
data-parallel entry point (:mod:`.distributed`)."""
