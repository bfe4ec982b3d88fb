"""Training SEDD models: `sedd train`, `train(config, run_dir)`, configs in sedd_core/configs/."""
from .config import TrainConfig, TrainConfigError, load_train_config
from .trainer import Trainer, TrainingError, train

__all__ = ["TrainConfig", "TrainConfigError", "Trainer", "TrainingError", "load_train_config", "train"]
