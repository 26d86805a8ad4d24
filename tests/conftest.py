import signal
import subprocess
import sys

import pytest
import torch


# A shell without job control starts `command &` with SIGINT ignored, and children inherit that:
# the Ctrl-C tests would interrupt processes that ignore it. A handler is reset to the default in
# every child at exec, so the scripts these tests start take Ctrl-C as a user's terminal sends it.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def dead_pid():
    """The pid of a process that has ended, as a killed writer's temporary names carry."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def one_thread():
    """Tiny models are streams of tiny operations: two threads that wait on each other at every one of them are
    several times slower than one on a busy machine. Restored after the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_gpt(**config):
    """A GPT whose every weight, norms and biases too, is random (seed 0): nothing cancels out."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model
