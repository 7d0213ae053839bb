"""bertino: a hand-written PyTorch reimplementation of the multi-sentence-BERTino V5 training pipeline."""

from .encoder import SentenceEncoder
from .errors import BertinoError, CheckpointError, ConfigError, DataError

__all__ = ["SentenceEncoder", "BertinoError", "CheckpointError", "ConfigError", "DataError"]
__version__ = "0.1.0"
