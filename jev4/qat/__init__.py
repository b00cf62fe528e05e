"""Output quantization-aware training: tune one task's LoRA so its quantized embeddings lose (almost) nothing."""
