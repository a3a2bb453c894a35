"""Device profiles, the run-time memory model, and validation of exported artifacts on a profile."""
