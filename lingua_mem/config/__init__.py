"""Every command's configuration: schema.py (the dataclasses, choices as Literal types) <-
validate.py (one function per section) <- load.py (defaults <- YAML <- dotlist). Users and
the rest of lingua_mem import from here."""

from lingua_mem.config.load import load_config, run_data_defaults, to_dict  # noqa: F401
from lingua_mem.config.schema import *  # noqa: F403 (the dataclasses, Literal types, model_args)
from lingua_mem.config.validate import (  # noqa: F401
    EVAL_TASKS,
    check_word,
    parse_tasks,
    validate,
    validate_eval,
    validate_eval_command,
    validate_finetune,
    validate_generate,
    validate_lora,
    validate_model,
    validate_usage_command,
)
from lingua_mem.errors import ConfigError  # noqa: F401 (re-exported: config is where users look)
