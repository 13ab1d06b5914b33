"""amq.calib."""
