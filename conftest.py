"""Shared by the tests and the notebooks: one thread per pytest-xdist worker.

`make test` runs the suite in two pytest-xdist workers (`-n 2`). At the suite's sizes a training step
gains little from a second thread (small matrices), while two workers each on one core run two
notebooks or tests at once, so the suite takes about two thirds of the time it takes in one process.
Each worker, and every notebook kernel and process it starts (they inherit the environment), gets
cores // workers threads.
"""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    os.environ["OMP_NUM_THREADS"] = _threads
    os.environ["MKL_NUM_THREADS"] = _threads
    import torch

    torch.set_num_threads(int(_threads))
