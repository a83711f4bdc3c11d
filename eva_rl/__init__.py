"""eva-rl: fine-tune pretrained Decision Transformer agents offline with EVA-initialised adapters."""

__version__ = "0.1.0"
