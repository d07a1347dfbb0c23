"""fusionbench: config-driven multimodal fusion experiments."""

from pathlib import Path

__version__ = "0.1.0"

#: Repository root (the package is installed editable; configs/ and data/ live beside it).
ROOT = Path(__file__).resolve().parents[1]
