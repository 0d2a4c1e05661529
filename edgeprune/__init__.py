"""edgeprune: structured pruning of small LLMs for edge devices, exported to GGUF and ONNX."""

__version__ = "0.1.0"
