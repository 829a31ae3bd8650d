"""Small helpers shared across ovseg (weights loading)."""
