"""fp16 on CPU ranks: DeepSpeed's CPU accelerator refuses fp16; the fp16 tests lift that one check."""


def enable_fp16_on_cpu():
    """The one patch the fp16 tests make (tests/distributed/test_fp16.py): the CPU accelerator admits fp16."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
    CPU_Accelerator.is_fp16_supported = lambda self: True
