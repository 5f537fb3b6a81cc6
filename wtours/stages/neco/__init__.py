"""Stage 2: NeCo post-pretraining of an encoder on image crops."""
