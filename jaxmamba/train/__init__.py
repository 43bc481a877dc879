"""Training and evaluation: `train_and_evaluate(config, workdir)`, losses, metrics, checkpoints."""
from jaxmamba.train.trainer import train_and_evaluate

__all__ = ["train_and_evaluate"]
