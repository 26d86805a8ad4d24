import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models are streams of tiny operations: two threads that wait on each other at every one of them are
    several times slower than one on a shared CPU (see sample.py). Restored after the test, since training
    tests compare in-process runs bit for bit with runs in subprocesses, which use every core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def own_probe_cache(tmp_path_factory):
    """dtype=auto's CPU probe caches what it measures under XDG_CACHE_HOME: the tests' tiny models go to a
    folder of their own (their subprocesses too), not to the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield
