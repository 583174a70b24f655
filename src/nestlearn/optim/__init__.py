"""Deep optimizers and level clocks; filled in by the optimizer issue."""
