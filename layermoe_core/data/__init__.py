"""Corpora: reading them, the seeded old/new samples, and the on-disk token store they are sampled from."""
