"""``python -m deepspeed_dualpipe bench``: schedules timed through the real engine with cost-model layers.

- ``layers``: a layer that sleeps its configured forward / input-grad / weight-grad times.
- ``launch``: starts the gloo ranks once.
- ``rank``: what every rank runs: one engine per schedule, interleaved timed steps, traces.
- ``measure``: step time, busy time, bubble and plugin overhead from the traces.
- ``predict``: the simulator's figures for the same layers.
- ``run``: the command (arguments, tables, JSON).
"""
