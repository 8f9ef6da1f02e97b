"""Pure math, no I/O: aggregators, server optimizers, training strategies."""
