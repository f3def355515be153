"""Pure PyTorch: GPT configs and presets, the model, generation, tokenizers, losses and plain training loops."""
