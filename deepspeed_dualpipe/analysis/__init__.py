"""Schedules analysed without processes: events, symbolic execution, the verifier, the simulator,
text and pictures, and the export to torch.distributed.pipelining."""
