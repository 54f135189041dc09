"""Run a callback around every instruction an engine executes, for one measured stretch.

DeepSpeed's ``PipelineEngine`` looks each instruction's ``_exec_*`` up in ``_INSTRUCTION_MAP``;
shadowing that table on the instance reaches DeepSpeed's own engines and the plugin's alike,
and removing the shadow restores them.
"""

from contextlib import contextmanager


@contextmanager
def around_each_instruction(engine, before=None, after=None):
    """Within the block, ``before(kind)`` and ``after(kind)`` run around each instruction of
    ``engine`` (``kind``: the instruction class); ``after`` runs even when the instruction raises."""
    own = vars(engine).get("_INSTRUCTION_MAP")
    table = own if own is not None else type(engine)._INSTRUCTION_MAP

    def wrapped(kind, execute):
        def run(self, **kwargs):
            if before is not None:
                before(kind)
            try:
                return execute(self, **kwargs)
            finally:
                if after is not None:
                    after(kind)
        return run

    engine._INSTRUCTION_MAP = {kind: wrapped(kind, fn) for kind, fn in table.items()}
    try:
        yield engine
    finally:
        if own is None:
            del engine._INSTRUCTION_MAP
        else:
            engine._INSTRUCTION_MAP = own
