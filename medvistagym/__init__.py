"""MedVistaGym: train vision-language models to think with medical images."""

__version__ = "0.1.0"
