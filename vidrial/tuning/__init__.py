"""Tuned-config store (JSON files per GPU and kernel family) and what the tuner writes."""
