"""Datasets of the experiments, each fetched once and verified always.

``fetch`` is the machinery every dataset shares (cache -> sources -> a clear error saying what to
do offline; SHA-256 verification; atomic cache writes; a corrupt cache entry is fetched again).
``mnist`` and ``brown`` are the two datasets built on it.
"""
