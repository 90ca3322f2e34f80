"""Caption metrics (pycocoevalcap, offline) and the fast CIDEr-D reward."""
