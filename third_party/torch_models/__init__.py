"""PyTorch reference models (test oracles), written from the specs with the key names of the authors."""
