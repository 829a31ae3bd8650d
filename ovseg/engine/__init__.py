from .checkpoint import SafeCheckpointer, is_intact_checkpoint
from .data import ResumableTrainLoader
from .errors import NonFiniteLossError, UserError, run_command
from .trainer import (
    DATASET_MAPPERS,
    SaveOnSignal,
    Trainer,
    build_mapper,
    check_inputs,
    default_argument_parser,
    full_model_clipping,
    launch,
    launched_main,
    load_config,
    load_config_file,
    load_eval_weights,
    main,
    merge_opts,
    resolve_device,
    run,
    set_test_vocabulary,
    setup,
)

__all__ = ["DATASET_MAPPERS", "NonFiniteLossError", "ResumableTrainLoader", "SafeCheckpointer", "SaveOnSignal",
           "Trainer", "UserError", "build_mapper", "check_inputs", "default_argument_parser", "full_model_clipping",
           "is_intact_checkpoint", "launch", "launched_main", "load_config", "load_config_file", "load_eval_weights",
           "merge_opts", "main",
           "resolve_device", "run", "run_command", "set_test_vocabulary", "setup"]
