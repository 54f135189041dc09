"""Python loads this at start-up when this directory is on PYTHONPATH: in the ranks of a job (the launcher sets
LOCAL_RANK) with ``A2A_PROBE_OUT`` set, it records the all-to-alls of the plugin's phased layers (a2a_probe.py).
``A2A_PROBE_PLANT=sync`` waits on every all-to-all as it is launched: a planted defect the overlap check must
catch."""
import os

if os.environ.get("A2A_PROBE_OUT") and "LOCAL_RANK" in os.environ:
    import a2a_probe
    a2a_probe.install(os.environ["A2A_PROBE_OUT"], sync=os.environ.get("A2A_PROBE_PLANT") == "sync")
