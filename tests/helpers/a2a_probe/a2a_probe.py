"""When did each all-to-all of the plugin's phased layers complete, and what computed meanwhile?

For a job run in other processes (Megatron-DeepSpeed's pretrain_gpt.py): ``sitecustomize.py`` beside this file
calls :func:`install` in every rank; each rank writes ``rank{R}.json`` at exit, and :func:`figures` reads one.

An all-to-all's completion is observed on its work handle, never taken from when it was waited:

- ``work.is_completed()``, polled at the start and the end of every step of the engine's step drivers
  (``steps._Driver.step``): direct, but only at those instants;
- a completion callback on its future (``work.get_future().then``) that stamps ``time.perf_counter()`` on the
  backend's thread: continuous, but late by however long the callback waits for the GIL (the switch interval is
  set to 0.1 ms here).

A pair's compute step is a driver's step minus the time it spent in ``Pending.wait`` (a step's waits come first,
when it resumes after its own all-to-all). Pairs are the calls of ``steps.interleave``.
"""
import atexit
import json
import os
import sys
import time


def install(out_dir, sync=False):
    """Record this process's all-to-alls and pair steps; write ``out_dir/rank{RANK}.json`` at exit. ``sync``:
    wait on every all-to-all as it is launched (a planted defect: nothing can then overlap)."""
    sys.setswitchinterval(1e-4)
    import deepspeed_dualpipe
    from deepspeed_dualpipe.runtime.autograd import steps, tape
    records, pair_steps, live, waited, pair = [], [], [], [0.0], [None, 0]
    launch_all_to_all, wait, step, interleave = (tape.launch_all_to_all, tape.Pending.wait, steps._Driver.step,
                                                 steps.interleave)

    def probed_launch(x, group, name):
        pending = launch_all_to_all(x, group, name)
        work = pending._work
        rec = {
            "id": len(records),
            "name": name,
            "start": pending.start,
            "done_callback": None,
            "done_polled": None,
            "label": None,
            "pair": None,
            "moves_data": work is not None
        }
        if work is not None:
            work.get_future().then(lambda _, rec=rec: rec.__setitem__("done_callback", time.perf_counter()))
        pending._probe = (rec, work)
        records.append(rec)
        if sync:
            pending.wait()
        return pending

    def probed_wait(self):
        start = time.perf_counter()
        try:
            return wait(self)
        finally:
            waited[0] += time.perf_counter() - start

    def poll(now):
        for rec, work in live:
            if rec["done_polled"] is None and work.is_completed():
                rec["done_polled"] = now

    def probed_step(self):
        start = time.perf_counter()
        poll(start)
        others = [rec["id"] for rec, _ in live if rec["label"] != self.label and rec["done_polled"] is None]
        waited_before = waited[0]
        step(self)
        end = time.perf_counter()
        poll(end)
        ongoing = {rec["id"] for rec, _ in live if rec["done_polled"] is None}
        launched = getattr(self.pending, "_probe", None)
        if launched is not None and launched[1] is not None:
            launched[0]["label"], launched[0]["pair"] = self.label, pair[0]
            live.append(launched)
        pair_steps.append({
            "label": self.label,
            "pair": pair[0],
            "start": start,
            "end": end,
            "waited": waited[0] - waited_before,
            "others_in_flight_at_start": others,
            "others_in_flight_at_end": [i for i in others if i in ongoing]
        })
        live[:] = [(rec, work) for rec, work in live if rec["done_polled"] is None]

    def probed_interleave(*args, **kwargs):
        pair[0], pair[1] = pair[1], pair[1] + 1
        try:
            return interleave(*args, **kwargs)
        finally:
            pair[0] = None

    tape.launch_all_to_all = steps.launch_all_to_all = probed_launch
    tape.Pending.wait, steps._Driver.step, steps.interleave = probed_wait, probed_step, probed_interleave

    def dump():
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"rank{os.environ.get('RANK', os.environ['LOCAL_RANK'])}.json"), "w") as f:
            json.dump(
                {
                    "deepspeed_dualpipe": deepspeed_dualpipe.__file__,
                    "all_to_alls": records,
                    "steps": [s for s in pair_steps if s["pair"] is not None]
                }, f)

    atexit.register(dump)


def figures(path):
    """One rank's figures: how many of the pairs' all-to-alls were seen in flight when the other micro-batch's
    compute step started (and still at its end), and the all-to-all time (launch to completion) that overlapped
    the other micro-batch's compute: at least (steps it spanned whole) and by the completion callbacks."""
    with open(path) as f:
        data = json.load(f)
    by_pair = {}
    for s in data["steps"]:
        by_pair.setdefault(s["pair"], []).append(s)
    paired = [r for r in data["all_to_alls"] if r["pair"] is not None]
    seen = spanned = 0
    total = hidden = hidden_at_least = 0.0
    for r in paired:
        others = [s for s in by_pair[r["pair"]] if s["label"] != r["label"]]
        at_start = [s for s in others if r["id"] in s["others_in_flight_at_start"]]
        whole = [s for s in at_start if r["id"] in s["others_in_flight_at_end"]]
        seen, spanned = seen + bool(at_start), spanned + bool(whole)
        done = r["done_callback"] if r["done_callback"] is not None else r["done_polled"]
        total += done - r["start"]
        hidden += sum(max(0.0, min(done, s["end"]) - max(r["start"], s["start"] + s["waited"])) for s in others)
        hidden_at_least += sum(s["end"] - s["start"] - s["waited"] for s in whole)
    return {
        "deepspeed_dualpipe": data["deepspeed_dualpipe"],
        "pairs": len(by_pair),
        "all_to_alls": sum(r["moves_data"] for r in data["all_to_alls"]),
        "in_pairs": len(paired),
        "in_flight_when_other_compute_started": seen,
        "in_flight_through_other_compute_step": spanned,
        "all_to_all_ms": 1e3 * total,
        "hidden_ms": 1e3 * hidden,
        "hidden_ms_at_least": 1e3 * hidden_at_least,
    }


if __name__ == "__main__":  # python a2a_probe.py DIR...: every rank's figures
    import glob
    for directory in sys.argv[1:]:
        for path in sorted(glob.glob(os.path.join(directory, "rank*.json"))):
            f = figures(path)
            if path.endswith("rank0.json"):
                print(f"{directory}: deepspeed_dualpipe imported from {f['deepspeed_dualpipe']}")
            print(f"{directory} {os.path.basename(path)[:-5]}: " +
                  " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in f.items() if k != "deepspeed_dualpipe"))
