"""The contract between a worker process and `trapq worker` (tasks.worker.supervisor).

A worker tells its supervisor why it stopped by its exit code, and learns who supervises it
from one environment variable. Both sides import this module alone, so the supervisor never
pulls in Celery's worker machinery or torch to read three numbers.
"""

from __future__ import annotations

import signal

ORPHANED_EXIT = 70  # the supervisor was already gone when the child started: not restarted
MEMORY_RESTART_EXIT = 75  # EX_TEMPFAIL: stopped itself to shed RSS: restarted at once
DEVICE_FAULT_EXIT = 76  # a CUDA error poisoned the process: restarted with a fresh context
LOAD_FAILED_EXIT = 78  # EX_CONFIG: the models or the broker setup are wrong: not restarted

SUPERVISOR_PID_ENV = "TRAPQ_SUPERVISOR_PID"  # set by the supervisor in each child's environment
DEATH_SIGNAL = signal.SIGTERM  # what a child gets when its supervisor dies: Celery's warm shutdown
