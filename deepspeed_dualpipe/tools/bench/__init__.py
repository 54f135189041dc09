"""``python -m deepspeed_dualpipe bench``: schedules timed through the real engine with cost-model layers.

- ``layers``: a layer that sleeps its configured forward / input-grad / weight-grad times, and its
  MoE variant (``--a2a``) with a real dispatch and combine all-to-all per layer.
- ``rank``: what every rank runs: one engine per run, interleaved timed steps, traces, one
  memory-sampling step per run, and the time of one all-to-all alone.
- ``measure``: step time, busy time, bubble, plugin overhead and peak activation memory from the traces.
- ``predict``: the simulator's figures for the same layers (all-to-alls and overlapped pairs included).
- ``wire``: the emulated interconnect (``--a2a-wire``): all-to-alls that take wire time, not CPU.
- ``torch_peer``: torch.distributed.pipelining's own schedules on the same layers, as rows beside the plugin's.
- ``split_cost``: the split backward's host cost on one chunk of the demo model (input + weight part over whole).
- ``run``: the command (arguments, launching the ranks, JSON).
- ``report``: the targets a result is judged against, and the tables it prints.
- ``overlap``: ``python -m deepspeed_dualpipe overlap``, one MoE pair on 2 ranks.
"""
