"""`[core] hostname_callable` of the distributed deployment: each component names the node it plays.

All components share one loopback machine, so `getfqdn()` would give every task instance the same
`hostname`. With `ZIMAGE_E2E_NODE` set per component (inherited by a Celery worker's task processes),
the REST API's `hostname` of a task instance says which worker ran it, and the `job` table which
triggerer or scheduler is which. Imported by Airflow in every component: keep it dependency-free.
"""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    return os.environ.get("ZIMAGE_E2E_NODE") or socket.getfqdn()
