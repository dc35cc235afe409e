"""DeepSeekMoE (fine-grained + shared experts) for Megatron-core: layer specs, trainer, converters.

Importing the package imports nothing heavy; see README.md for the entry points.
"""

__version__ = "0.1.0"
