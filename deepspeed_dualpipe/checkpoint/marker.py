"""Optimizer state that DeepSpeed's own loader cannot take for its own by mistake.

Optimizer state is stored per pipeline rank, for the parameters that rank held; under a chunked placement
(DualPipe, DualPipeV, interleaved...) a rank's parameters are other layers than under DeepSpeed's 1F1B, yet
the per-rank counts can match, and ``torch.optim.Optimizer.load_state_dict`` then loads one layer's moments
into another without a word. So the plugin's save of such a placement moves the optimizer entries of its
files under a key of its own and leaves in their place a note without ``param_groups``: DeepSpeed's loader,
without the plugin's load hook, fails on it (``KeyError: 'param_groups'``) instead of mis-loading, and the
note says why. The plugin's load (``deepspeed_dualpipe.checkpoint.load_checkpoint``, and DeepSpeed's
``load_checkpoint`` once the plugin is installed) checks the placement first, then puts the entries back.
Files of DeepSpeed's own linear placement are left as DeepSpeed writes them.
"""

KEYS = ("optimizer", "optimizer_state_dict")  # DeepSpeed's model-states file; its ZeRO files
PREFIX = "dualpipe_placed_"


def mark(state_dict, layout: dict):
    """``state_dict`` as written for ``layout``: a shallow copy with its optimizer entries moved, if any."""
    if layout.get("layout") == "linear" or not isinstance(state_dict, dict):
        return state_dict
    keys = [k for k in KEYS if state_dict.get(k) is not None]
    if not keys:
        return state_dict
    marked = dict(state_dict)
    for key in keys:
        marked[PREFIX + key] = marked[key]
        marked[key] = {
            "dualpipe_placement": {
                k: layout.get(k)
                for k in ("schedule", "layout", "pipe_parallel_size", "stage_boundaries")
            },
            "why": (f"optimizer state of schedule {layout.get('schedule')} ({layout.get('layout')} placement): "
                    f"it is under '{PREFIX + key}' and loads only with deepspeed_dualpipe installed, into the same "
                    f"placement; pass load_optimizer_states=False to load the weights only")
        }
    return marked


def unmark(state_dict):
    """The state dict as DeepSpeed wrote it (what :func:`mark` moved, back in place)."""
    if not isinstance(state_dict, dict) or not any(PREFIX + k in state_dict for k in KEYS):
        return state_dict
    restored = dict(state_dict)
    for key in KEYS:
        if PREFIX + key in restored:
            restored[key] = restored.pop(PREFIX + key)
    return restored
