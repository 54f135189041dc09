"""The applications behind ``python -m deepspeed_dualpipe``: the demo language model and its
ablations (:mod:`.lm`), and the benchmarks (:mod:`.bench`)."""
