from .trainer import (
    DATASET_MAPPERS,
    Trainer,
    build_mapper,
    default_argument_parser,
    full_model_clipping,
    launch,
    launched_main,
    main,
    run,
    set_test_vocabulary,
    setup,
)

__all__ = ["DATASET_MAPPERS", "Trainer", "build_mapper", "default_argument_parser", "full_model_clipping", "launch",
           "launched_main", "main", "run", "set_test_vocabulary", "setup"]
