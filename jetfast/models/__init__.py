"""Neural network models: the convolutional VAE (stage 1) and the code Transformer."""
