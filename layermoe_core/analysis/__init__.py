"""What decides a round's shape: per-layer similarity, the other papers' signals, the allocation, routing statistics."""
