"""amq.graph."""
