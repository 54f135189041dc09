"""What runs a schedule inside DeepSpeed: the engine, its point-to-point traffic, gradient work,
the chunked module, the instruction trace and the allocator meter (:mod:`.memory`). Autograd tools are in :mod:`.autograd`."""
