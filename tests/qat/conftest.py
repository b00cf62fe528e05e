"""One torch thread for the QAT tests.

The tiny model's ops are microseconds long; with several test processes
sharing the 2-core CI machine, torch's default of one thread per core spends
far longer synchronising threads than computing (measured here: 40 training
steps took 180 s with 2 contended threads, 8 s with one).
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
