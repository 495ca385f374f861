"""livercube."""
