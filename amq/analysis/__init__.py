"""amq.analysis."""
