"""The applications behind ``python -m deepspeed_dualpipe``: the demo language model and its
ablations (:mod:`.lm`), the benchmarks (:mod:`.bench`) and ``advise``. The memory meter they share is the
runtime's (:mod:`deepspeed_dualpipe.runtime.memory`)."""
