"""Typed configuration: the public names of the dataclass tree (:mod:`.schema`) and its loading (:mod:`.loading`).

``from mscl_stream.config import Config, load_config`` is the way in; the fields and their meaning
live in ``schema.py``, YAML reading, overrides and validation in ``loading.py``.
"""

from mscl_stream.config.loading import (ALLOW_IMPORT_ENV, RENAMED_KEYS, ConfigError, apply_override, dump_config,
                                        from_dict, load_config, to_dict, validate)
from mscl_stream.config.schema import (AugmentConfig, Config, DataConfig, DistConfig, EvalConfig, FlowConfig,
                                       LogConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig)

__all__ = ["ALLOW_IMPORT_ENV", "RENAMED_KEYS", "AugmentConfig", "Config", "ConfigError", "DataConfig", "DistConfig",
           "EvalConfig", "FlowConfig", "LogConfig", "LossConfig", "ModelConfig", "OptimConfig", "TrainConfig",
           "apply_override", "dump_config", "from_dict", "load_config", "to_dict", "validate"]
