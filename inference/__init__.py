"""Pure PyTorch side of trapq: fetch, decode, model registry and the batched engine.

No Celery and no SQL here, so it can be used and tested without a broker or a database.
"""
