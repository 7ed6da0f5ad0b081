"""Bengio et al.'s neural language model and a small transformer on the Brown corpus, their
softmax over the vocabulary through jxent's fused output layer (README.md)."""
