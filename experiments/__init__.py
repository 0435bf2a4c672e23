"""Reproductions of the MallowsPO paper's claims, each a script that writes tables and figures.

Run one with ``python -m experiments.<name> [--quick] [--out DIR] [--seed S]``; see experiments/README.md.
"""
