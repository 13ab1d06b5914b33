"""amq.quant."""
