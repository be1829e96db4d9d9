"""spmc's Flower app: any spmc defense as the strategy, SPMC's client procedure on every node."""
