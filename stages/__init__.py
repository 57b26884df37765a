"""The DVC stages: one thin script per stage, run as ``python -m stages.<name>``.

Every stage process keeps freed memory for reuse (:mod:`pipeline.infra.allocator`), before torch
allocates anything: the same outputs, without a page fault for every activation tensor."""

from pipeline.infra.allocator import keep_freed_memory

keep_freed_memory()
