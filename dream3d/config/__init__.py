"""The typed run configuration: ``schema.py`` (RunConfig and its sections), ``presets.py`` (every place the config
names a component, and the merge order), ``limits.py`` (memory and size bounds), ``io.py`` (YAML, overrides,
merging) and ``sample_options.py`` (``dream3d sample``'s options). The saved ``config.yaml`` of a run re-runs the
same job."""

from dream3d.config.io import (
    MAX_NESTING, ConfigError, check_nesting, check_options, load_yaml, merge, parse_overrides, safe_yaml, to_yaml,
)
from dream3d.config.presets import AUTO, auto_prior, toy_refusal
from dream3d.config.sample_options import SampleOptions
from dream3d.config.schema import (
    EXPORT_FORMATS, GUIDANCES, PRIOR_CHOICES, PRIORS, REPRESENTATIONS, ExportConfig, LossConfig, NoiseConfig,
    OptimConfig, RefineConfig, RunConfig, RunSettings, build_config, check_export_options,
)

__all__ = [
    "AUTO", "EXPORT_FORMATS", "GUIDANCES", "MAX_NESTING", "PRIOR_CHOICES", "PRIORS", "REPRESENTATIONS", "ConfigError", "ExportConfig", "LossConfig", "NoiseConfig",
    "OptimConfig", "RefineConfig", "RunConfig", "RunSettings", "SampleOptions", "auto_prior", "build_config",
    "check_export_options", "check_nesting", "check_options", "load_yaml", "merge",
    "parse_overrides", "safe_yaml", "to_yaml", "toy_refusal",
]
