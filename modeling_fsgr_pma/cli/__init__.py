"""The `fsgr-pma` command: caption and explain images with a trained model (and its loading helpers)."""
