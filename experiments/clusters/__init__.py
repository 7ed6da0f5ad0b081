"""The NumPy tutorial's five-cluster toy: its recipe against Adam, same MLP (README.md)."""
