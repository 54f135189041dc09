"""The applications behind ``python -m deepspeed_dualpipe``: the demo language model and its
ablations (:mod:`.lm`), the benchmarks (:mod:`.bench`), and the memory meter both use (:mod:`.memory`:
bytes in use at the allocator around every instruction)."""
