"""skystack wiring: builds lazy plans from pipeline tasks and executes them (the only place that computes)."""
