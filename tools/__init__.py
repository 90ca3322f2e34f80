"""Lab tools: benchmarks, ablations, vision probes, CLIP pre-training for the synthetic world, screenshots, GPU check."""
