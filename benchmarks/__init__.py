"""Side-by-side speed and memory measurements of skystack against its peers (``python -m benchmarks``).

Not part of the installed distribution and not a runtime dependency of it; see ``README.md`` here.
"""
