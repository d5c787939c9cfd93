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
