"""MNIST: an MLP and the Keras tutorial's LeNet-5, trained with jxent's loss (README.md)."""
