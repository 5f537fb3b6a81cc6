"""Stage 1: video pretraining from scratch (DoRA and/or TimeT) on walking-tour clips."""
