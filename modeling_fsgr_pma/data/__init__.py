"""Training-side data: caption splits in five layouts, the synthetic world, the feature cache, the tokenizer trainer."""
