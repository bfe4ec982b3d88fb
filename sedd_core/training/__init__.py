"""Training SEDD models: `sedd train`, `train(config, run_dir)`, configs in sedd_core/configs/."""
from .config import TrainConfig, TrainConfigError, config_for_init, load_train_config
from .distributed import Ranks
from .trainer import Trainer, TrainingError, train

__all__ = ["Ranks", "TrainConfig", "TrainConfigError", "Trainer", "TrainingError", "config_for_init",
           "load_train_config", "train"]
