//! Checkpoints: safetensors readers and writers for compressed-tensors, GPTQ and Marlin formats.
