"""largebatch: large-minibatch synchronous SGD for ResNet-class image models."""
__version__ = "0.1.0"
