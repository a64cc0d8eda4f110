"""lightning_moe: mixtures of LoRA experts on frozen foundation models, trained with Lightning."""

__version__ = "0.1.0"
