"""genrecal: distill a large vision-language model into a small one across token types (GenRecal)."""

__version__ = "0.1.0"
