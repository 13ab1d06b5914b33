"""amq.search."""
