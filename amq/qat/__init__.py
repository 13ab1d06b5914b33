"""amq.qat."""
