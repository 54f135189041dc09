"""What runs a schedule inside DeepSpeed: the engine, its point-to-point traffic, gradient work,
the chunked module and the instruction trace. Autograd tools are in :mod:`.autograd`."""
