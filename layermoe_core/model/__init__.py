"""The expanded model: its config, the MoE block and experts, the surgery that makes it, its losses and checkpoints."""
