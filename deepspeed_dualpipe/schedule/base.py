"""The base of the plugin's schedules: a DeepSpeed ``PipeSchedule`` built from a program."""

import functools
from abc import abstractmethod

from deepspeed.runtime.pipe.schedule import PipeSchedule

from deepspeed_dualpipe.schedule.layout import Layout, LayoutKind
from deepspeed_dualpipe.schedule.builder import ProgramBuilder, assign_buffers
from deepspeed_dualpipe.schedule.lockstep import lockstep


def require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def set_micro_batches(count: int) -> str:
    """How a user sets the micro-batches per batch to ``count``: DeepSpeed's config key, and the flag a Megatron user
    sets instead (Megatron derives gradient_accumulation_steps from its global batch)."""
    return (f"set gradient_accumulation_steps to {count} (Megatron-DeepSpeed: --global-batch-size to {count} x "
            f"--micro-batch-size x the data-parallel size)")


@functools.lru_cache(maxsize=8)  # every rank's program of a shape: large ones must not pile up
def _lockstep_programs(cls, micro_batches: int, stages: int, forward_only: bool):
    """Every rank's steps of ``cls`` placed by :func:`~.lockstep.lockstep`, computed once per shape (each rank's
    schedule, and the verifier's, needs them all). Callers copy a rank's steps before assigning buffers."""
    layout = Layout(cls.layout_kind, stages, micro_batches)
    return lockstep([cls.rank_program(layout, rank, forward_only, commits=False) for rank in range(stages)])


class ProgramSchedule(PipeSchedule):
    """A schedule whose instructions come from :meth:`program`, written with :class:`ProgramBuilder` verbs.

    A schedule's facts are class attributes, read by the registry, the tests, the bench, the simulator,
    the torch export and ``initialize`` (docs/design.md, "Adding a schedule").

    Args:
        micro_batches: micro-batches per batch (DeepSpeed's ``gradient_accumulation_steps``).
        stages: pipeline ranks (each may hold several chunks).
        stage_id: the pipeline rank that runs this schedule.
        forward_only: skip backward, weight passes and the optimizer step (evaluation).
    """

    name = ""  # the config name (``pipeline.schedule``)
    summary = ""  # one line for the registry's listings
    layout_kind = LayoutKind.LINEAR  # where its chunks live (:class:`~.layout.Layout`)
    # Runs overlapped F&B pairs (the builder's ``forward_backward``), where dualpipe.overlap_moe_a2a applies.
    paired = False
    split_backward = False  # splits backwards into input (I) and weight (W) passes
    table2 = None  # the row of DeepSeek-V3's Table 2 it follows (analysis.simulate.TABLE2), or None
    torch_inexpressible = None  # why torch.distributed.pipelining cannot express it, or None when it can
    # True: the program places receives and sends only around each computation, and groups NCCL can complete
    # come from :func:`~.lockstep.lockstep` over every rank's program instead (interleaved 1F1B, ZB-V)
    lockstep_p2p = False

    def __init__(self, micro_batches: int, stages: int, stage_id: int, forward_only: bool = False):
        self.validate(stages, micro_batches)
        if isinstance(stage_id, bool) or not isinstance(stage_id, int) or not 0 <= stage_id < stages:
            raise ValueError(f"stage_id must be a pipeline rank in 0..{stages - 1}, got {stage_id!r}")
        super().__init__(micro_batches, stages, stage_id)
        self.forward_only = forward_only
        self.layout = Layout(self.layout_kind, stages, micro_batches)
        if self.lockstep_p2p:
            programs = _lockstep_programs(type(self), micro_batches, stages, forward_only)
            self._steps = _copy_steps(programs[stage_id])  # buffers are assigned in place
        else:
            self._steps = self.rank_program(self.layout, stage_id, forward_only)
        self._buffers = assign_buffers(self._steps)

    @classmethod
    def rank_program(cls, layout: Layout, rank: int, forward_only: bool, commits: bool = True):
        """Rank ``rank``'s steps, as :meth:`program` writes them into a fresh builder."""
        builder = ProgramBuilder(layout, rank, forward_only)
        cls.program(builder)
        return builder.finish(reduce_mirror=layout.param_copies > 1, commits=commits)

    @classmethod
    def validate(cls, stages: int, micro_batches: int) -> None:
        """Raise ValueError naming the bad value and what would be valid."""
        require_int("stages", stages, 1)
        require_int("micro_batches", micro_batches, 1)

    @classmethod
    @abstractmethod
    def program(cls, b: ProgramBuilder) -> None:
        """Issue the operations of rank ``b.rank``, in order, through the builder's verbs: a function of the
        builder alone (its rank, ``b.stages``, ``b.micro_batches``, ``b.layout``)."""

    def steps(self):
        yield from self._steps

    def num_pipe_buffers(self) -> int:
        return max(1, self._buffers)


def _copy_instruction(instruction):
    """A copy as ``copy.deepcopy`` makes it, in a fraction of its time: an instruction's attributes are ints and
    strings, and ``kwargs``, a dict of them."""
    copied = object.__new__(type(instruction))
    copied.__dict__ = {k: dict(v) if isinstance(v, dict) else v for k, v in vars(instruction).items()}
    return copied


def _copy_steps(steps):
    return [[_copy_instruction(i) for i in step] for step in steps]
