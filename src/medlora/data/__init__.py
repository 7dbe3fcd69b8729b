"""Data stage: sources → records → clean/split → formatted, loss-masked token ids."""
