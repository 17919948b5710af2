"""Model surgery: attention heads removed, activations quantised, layers reused, models named by spec."""
