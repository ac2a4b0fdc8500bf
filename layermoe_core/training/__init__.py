"""Stage-1 and Stage-2 training with HF Trainer, their `accelerate launch` jobs, and a round's size and memory estimate."""
