"""Training-side code: the shared training steps, open_clip backbones and codebooks, PEFT adapters, throughput."""
