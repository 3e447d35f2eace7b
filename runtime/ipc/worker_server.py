"""The first module the daemon's fork server imports (``daemon.worker_start = "forkserver"``).

multiprocessing's fork server runs no code of ours besides the modules it is told to preload
(runtime/daemon/process.py: ``WORKER_SERVER_PRELOAD``), so this one is first of them: importing it
makes the server die with the supervisor and marks it as the parent of the workers it forks
(:func:`runtime.ipc.lifetime.become_worker_server`). Nothing else imports it.
"""

from __future__ import annotations

from runtime.ipc.lifetime import become_worker_server

become_worker_server()
