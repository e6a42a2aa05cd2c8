"""New cache classes: the code that goes upstream as-is."""
