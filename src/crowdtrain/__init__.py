"""crowdtrain: collaborative training of language models over the internet."""

__version__ = "0.1.0"
