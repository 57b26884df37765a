"""The DVC stages: one thin script per stage, run as ``python -m stages.<name>``.

Under ``python cli.py run`` a stage process first hands its run to the warm fork server
(:mod:`pipeline.infra.forkserver`: the same run, without importing torch and diffusers again). Every
process that runs a stage keeps freed memory for reuse (:mod:`pipeline.infra.allocator`), before torch
allocates anything: the same outputs, without a page fault for every activation tensor."""

from pipeline.infra.allocator import keep_freed_memory
from pipeline.infra.forkserver import hand_over_main_module

hand_over_main_module()
keep_freed_memory()
