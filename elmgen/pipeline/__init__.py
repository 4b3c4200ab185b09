"""The whole path as resumable stages (tokenizer -> codes -> LM -> samples -> evaluation), design-space
sweeps that share stages, and the demo with its report."""

from elmgen.pipeline.demo import quick_demo, run_demo
from elmgen.pipeline.stages import (
    PipelineConfig,
    StageDirs,
    config_hash,
    fit_to_codes,
    folder_config,
    run_pipeline,
    shared_dirs,
)
from elmgen.pipeline.sweep import SweepConfig, apply_overrides, expand, run_sweep
