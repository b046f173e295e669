"""Fine-tuning: data (formats.py: reading records; data.py: label masks, batches, packing), loop, checkpoints."""
