"""Synthetic moth-trap nights and the small models trained on them, for `trapq demo`."""
