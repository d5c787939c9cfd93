"""Suite-wide settings."""

import os

# Every optimize run in the suite (in-process and through the CLI) fails a pass whose edits escape its
# change log (qdqsurgeon.passes.audit.AuditInstrument, issue 13 item 6).
os.environ.setdefault("QDQSURGEON_AUDIT", "1")
