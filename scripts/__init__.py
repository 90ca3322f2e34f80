"""What a user runs: data, codebook, features, training, evaluation, fine-tuning, publishing, the web demo."""
