"""Figures and tables of a run."""
