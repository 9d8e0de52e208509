"""The job store: typed SQLAlchemy models and the queries producers and workers need.

Imports nothing else of trapq and never imports torch, so the admin side stays light.
"""
