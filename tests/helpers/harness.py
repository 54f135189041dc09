"""Multi-process equivalence harness for pipeline schedules.

Proves "a pipeline schedule trains to the same losses and parameters as one
process running the same model on the same global batch".  Pieces:

* ``run_distributed(fn, world_size, *args)`` launches ranks on CPU/gloo and
  returns their (picklable) results, never hanging the test suite.
* ``train_pipeline(initialize, ...)`` runs inside a rank: builds a
  ``PipelineModule``, trains it with any ``initialize`` function that returns
  an engine with ``train_batch`` (DeepSpeed's own, or the plugin's) and
  reports losses plus initial/final parameters under partition-independent
  names.
* ``train_reference(...)`` is the single-process ground truth.
* ``compare(...)`` checks one against the other.

Parameter naming (identical on both sides, independent of partitioning):
``layer{idx}.{param}`` for ordinary layers (``idx`` = position in the spec
list, which is what ``PipelineModule`` uses as the submodule name) and
``tied.{key}.{param}`` for ``TiedLayerSpec`` modules.
"""

import functools

import numpy as np
import torch

from deepspeed_dualpipe.testing.launch import run_ranks

LR = 0.1  # large enough that 3 SGD steps move every parameter measurably
SEQ_LEN = 6

# --------------------------------------------------------------------------
# Process launching
# --------------------------------------------------------------------------


def run_distributed(fn, world_size, *args, timeout=180, strict_p2p=None):
    """Run ``fn(*args)`` on ``world_size`` spawned gloo ranks; return results by rank.

    ``fn`` and ``args`` must be picklable (module-level functions, partials). A rank that raises,
    dies or hangs fails the test (``RankFailure``, an AssertionError) naming the rank.
    ``strict_p2p`` (a timeout in seconds): NCCL's point-to-point rules, emulated on gloo
    (``deepspeed_dualpipe.testing.strict_p2p``).
    """
    return run_ranks(fn, world_size, *args, timeout=timeout, strict_p2p=strict_p2p)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def make_batches(seed, steps, dp, micro_batches, micro_batch_size, seq_len=SEQ_LEN, vocab=32):
    """``batches[step][dp_rank]`` = list of ``micro_batches`` (inputs, labels).

    Inputs and labels are int64 token ids of shape [micro_batch_size, seq_len];
    generated from one seeded generator so every rank and the reference see
    exactly the same tensors.
    """
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        per_dp = []
        for _ in range(dp):
            mbs = []
            for _ in range(micro_batches):
                x = torch.randint(0, vocab, (micro_batch_size, seq_len), generator=g)
                y = torch.randint(0, vocab, (micro_batch_size, seq_len), generator=g)
                mbs.append((x, y))
            per_dp.append(mbs)
        batches.append(per_dp)
    return batches


# --------------------------------------------------------------------------
# Parameter naming
# --------------------------------------------------------------------------


def _global_name(local_name):
    """PipelineModule parameter name -> partition-independent name."""
    head, _, rest = local_name.partition(".")
    if head == "tied_modules":
        key, _, param = rest.partition(".")
        return f"tied.{key}.{param}"
    assert head.isdigit(), f"unexpected PipelineModule parameter {local_name!r}"
    return f"layer{head}.{rest}"


def _unwrap(engine):
    return engine.module if hasattr(engine, "module") else engine


def pipeline_params(module):
    """{global name: numpy copy} of the parameters this rank holds."""
    return {_global_name(n): p.detach().float().cpu().numpy().copy() for n, p in module.named_parameters()}


# --------------------------------------------------------------------------
# Pipeline side (inside a rank)
# --------------------------------------------------------------------------


def _sgd(params):
    return torch.optim.SGD(params, lr=LR)


def tied_engine(config, P, seed=1234):
    """``models.tied_specs()`` cut into ``P`` stages, through ``deepspeed_dualpipe.initialize`` with SGD."""
    import deepspeed_dualpipe
    from deepspeed.pipe import PipelineModule
    from tests.helpers.models import loss_fn, tied_specs
    torch.manual_seed(seed)
    with torch.no_grad():  # PipelineModule broadcasts tied weights in place (see train_pipeline)
        model = PipelineModule(layers=tied_specs(), num_stages=P, loss_fn=loss_fn, partition_method="uniform")
    return deepspeed_dualpipe.initialize(model=model, config=config, optimizer=_sgd)[0]


def outcome(action):
    """(exception type name, message, seconds) of ``action()``: what a user would see, and when."""
    import time
    start = time.monotonic()
    try:
        action()
    except Exception as error:  # noqa: BLE001 - tests read what the user would see
        return type(error).__name__, str(error), time.monotonic() - start
    return "no error", "", time.monotonic() - start


def train_pipeline(initialize,
                   config,
                   specs_fn,
                   P,
                   steps,
                   batches,
                   loss_fn=None,
                   seed=1234,
                   eval_batches=None,
                   topology=None):
    """Train ``PipelineModule(specs_fn(), P stages)`` with ``initialize``.

    ``initialize`` has ``deepspeed.initialize``'s signature (keyword args
    ``model``, ``config``, ``optimizer``) and returns a tuple whose first
    element is an engine with ``train_batch(data_iter=...)``.
    ``config`` must set ``"gradient_clipping": 0.0``: DeepSpeed 0.19.8 clips
    to norm 1.0 by default, which the plain-SGD reference does not do.
    ``topology`` (a DeepSpeed ``ProcessTopology`` with ``P`` on its pipe axis): the module's, e.g. with a
    tensor-parallel (``model``) axis; parameters marked ``tensor_model_parallel`` are then shards, reported with
    their ``partition_dim`` (:func:`gather_tensor_parallel` joins them).
    Returns {"losses", "initial_params", "params", "rank", "stage", "dp_rank", "tp_rank", "partition_dims",
    "clip_coefficients"} (the last: the coefficient each step's gradient clipping applied, see
    :func:`_record_clipping`).
    """
    import deepspeed.comm as dist
    from deepspeed.pipe import PipelineModule

    assert "gradient_clipping" in config, "set gradient_clipping explicitly (DeepSpeed defaults to 1.0)"

    if loss_fn is None:
        from tests.helpers.models import loss_fn  # same loss as the reference

    # Same seed on every rank: initial weights are then reproducible; DeepSpeed
    # additionally broadcasts them over data-parallel groups and tied groups.
    torch.manual_seed(seed)
    # no_grad: PipelineModule.__init__ broadcasts tied weights in place
    # (dist.broadcast on the Parameter itself, not .data).  Under grad mode
    # torch records that c10d::broadcast_ in the autograd graph and warns
    # "autograd kernel was not registered" at every backward; building
    # under no_grad keeps the graph clean (results are the same either way).
    with torch.no_grad():
        shape = {"num_stages": P} if topology is None else {"topology": topology}
        model = PipelineModule(layers=specs_fn(), loss_fn=loss_fn, partition_method="uniform", **shape)
    engine = initialize(model=model, config=config, optimizer=_sgd)[0]
    module = _unwrap(engine)
    coefficients = _record_clipping(engine)

    initial = pipeline_params(module)
    dp_rank = engine.grid.get_data_parallel_id() if hasattr(engine, "grid") else 0
    stage = engine.stage_id if hasattr(engine, "stage_id") else None

    losses = []
    for step in range(steps):
        # Every stage of a pipeline gets the same iterator: the first stage
        # uses the inputs, the last stage the labels.
        loss = engine.train_batch(data_iter=iter(batches[step][dp_rank]))
        losses.append(float(loss.detach()))
    # After training: engine.eval_batch on each batch (this rank's data-parallel share).
    eval_losses = [float(engine.eval_batch(iter(b[dp_rank]))) for b in (eval_batches or [])]

    return {
        "eval_losses": eval_losses,
        "rank": dist.get_rank(),
        "stage": stage,
        "dp_rank": dp_rank,
        "losses": losses,
        "initial_params": initial,
        "params": pipeline_params(module),
        "tp_rank": engine.grid.get_slice_parallel_rank() if hasattr(engine, "grid") else 0,
        "partition_dims": {
            _global_name(n): p.partition_dim
            for n, p in module.named_parameters() if getattr(p, "tensor_model_parallel", False)
        },
        "clip_coefficients": [float(c) for c in coefficients],
    }


def _record_clipping(engine):
    """A list that receives the coefficient each step's fp32 gradient clipping applies on this rank.

    The plugin's ``clip_fp32_gradients`` returns it. DeepSpeed's own (1F1B, ds-dualpipev) calls
    ``clip_grad_norm_`` and drops the norm it returns: caught on the way, its coefficient computed as that
    function computes it (``max_norm / (norm + 1e-6)``, at most 1, in fp32).
    """
    from deepspeed.runtime import engine as ds_engine
    coefficients = []
    own = type(engine).clip_fp32_gradients is ds_engine.DeepSpeedEngine.clip_fp32_gradients

    def clip():
        if not own:
            coefficients.append(type(engine).clip_fp32_gradients(engine))
            return
        real = ds_engine.clip_grad_norm_

        def recording(*args, **kwargs):
            norm = real(*args, **kwargs)
            max_norm = torch.tensor([float(kwargs["max_norm"])])
            coefficients.append(torch.min(torch.tensor([1.0]), max_norm / (norm + 1e-6)))
            return norm

        ds_engine.clip_grad_norm_ = recording
        try:
            type(engine).clip_fp32_gradients(engine)
        finally:
            ds_engine.clip_grad_norm_ = real

    engine.clip_fp32_gradients = clip
    return coefficients


# --------------------------------------------------------------------------
# Reference side (single process, no DeepSpeed engine)
# --------------------------------------------------------------------------


def _build_reference(specs_fn):
    """Build all layers in order; return (forward fns, {global name: param})."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    funcs, named, tied = [], {}, {}
    for idx, spec in enumerate(specs_fn()):
        if isinstance(spec, TiedLayerSpec):
            # One module per key, shared by every occurrence (as PipelineModule).
            if spec.key not in tied:
                tied[spec.key] = spec.build()
                for n, p in tied[spec.key].named_parameters():
                    named[f"tied.{spec.key}.{n}"] = p
            mod = tied[spec.key]
            funcs.append(mod if spec.forward_fn is None else functools.partial(spec.forward_fn, mod))
        elif isinstance(spec, LayerSpec):
            mod = spec.build()
            for n, p in mod.named_parameters():
                named[f"layer{idx}.{n}"] = p
            funcs.append(mod)
        elif isinstance(spec, torch.nn.Module):
            for n, p in spec.named_parameters():
                named[f"layer{idx}.{n}"] = p
            funcs.append(spec)
        else:
            funcs.append(spec)  # plain callable, no parameters
    return funcs, named


def _batch_loss(funcs, batch, loss_fn):
    """Mean loss over the micro-batches of all data-parallel ranks: the batch loss DeepSpeed forms
    (per-micro-batch loss / GAS, summed, then averaged over DP)."""
    micro = [mb for per_dp in batch for mb in per_dp]
    total = 0.0
    for x, y in micro:
        out = x
        for f in funcs:
            out = f(out)
        total = total + loss_fn(out, y)
    return total / len(micro)


def _load(named, params):
    assert set(named) == set(params), (f"name mismatch: reference-only {sorted(set(named) - set(params))}, "
                                       f"pipeline-only {sorted(set(params) - set(named))}")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(torch.from_numpy(np.asarray(params[n])))


def evaluate_reference(specs_fn, params, batches, loss_fn=None):
    """The batch loss of ``params`` on each of ``batches``."""
    if loss_fn is None:
        from tests.helpers.models import loss_fn
    funcs, named = _build_reference(specs_fn)
    _load(named, params)
    with torch.no_grad():
        return [float(_batch_loss(funcs, batch, loss_fn)) for batch in batches]


def train_reference(specs_fn, initial_params, batches, steps, loss_fn=None, clip=0.0, keep_gradients=False):
    """Single-process ground truth starting from ``initial_params``.

    ``clip`` > 0 clips the gradient to that global norm before each step, as DeepSpeed's
    ``gradient_clipping`` does; "clip_coefficients" are the factors it applied. Each step's loss is
    :func:`_batch_loss`. ``keep_gradients``: "gradients" holds each step's gradients before clipping.
    """
    if loss_fn is None:
        from tests.helpers.models import loss_fn

    funcs, named = _build_reference(specs_fn)
    _load(named, initial_params)
    opt = torch.optim.SGD(list(named.values()), lr=LR)

    losses, coefficients, gradients = [], [], []
    for step in range(steps):
        opt.zero_grad()
        loss = _batch_loss(funcs, batches[step], loss_fn)
        loss.backward()
        if keep_gradients:
            gradients.append({n: p.grad.detach().numpy().copy() for n, p in named.items()})
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(list(named.values()), clip)
            coefficients.append(float((clip / (norm + 1e-6)).clamp(max=1.0)))  # as clip_grad_norm_ scales
        opt.step()
        losses.append(float(loss.detach()))
    return {
        "gradients": gradients,
        "clip_coefficients": coefficients,
        "losses": losses,
        "params": {
            n: p.detach().numpy().copy()
            for n, p in named.items()
        },
    }


def initial_params_from(results):
    """Union of the ranks' initial parameters (copies checked identical)."""
    merged = {}
    for res in results:
        for n, a in res["initial_params"].items():
            if n in merged:
                assert np.array_equal(merged[n], a), (f"initial copies of {n} differ (rank {res.get('rank')}): "
                                                      f"max diff {np.abs(merged[n] - a).max():.3e}")
            else:
                merged[n] = a
    return merged


def gather_tensor_parallel(results):
    """The results of each tensor-parallel group as one rank's: shards joined, replicas checked bit-identical.

    Ranks that differ only in their tensor-parallel coordinate (same ``stage``, same ``dp_rank``) hold the same
    parameter names. A shard (in ``partition_dims``) is joined with its peers' in tensor-parallel order along its
    ``partition_dim``; any other parameter is held whole by every one of them and must have the same bits on all,
    as must their losses. Returns one result per group ("rank": the group's ranks), for :func:`compare` and
    :func:`initial_params_from`.
    """
    groups = {}
    for res in results:
        groups.setdefault((res["stage"], res["dp_rank"]), []).append(res)
    merged, problems = [], []
    for members in groups.values():
        members = sorted(members, key=lambda res: res["tp_rank"])
        assert [m["tp_rank"] for m in members] == list(range(len(members))), [m["rank"] for m in members]
        first = members[0]
        ranks = [m["rank"] for m in members]
        joined = dict(first, rank=ranks)
        for m in members[1:]:
            if list(m["losses"]) != list(first["losses"]):
                problems.append(f"losses of rank {m['rank']} {m['losses']} differ from rank {first['rank']}'s "
                                f"{first['losses']}")
        for key in ("initial_params", "params"):
            joined[key] = {}
            for name, value in first[key].items():
                dim = first["partition_dims"].get(name)
                if dim is not None:
                    joined[key][name] = np.concatenate([m[key][name] for m in members], axis=dim)
                    continue
                for m in members[1:]:
                    if not np.array_equal(m[key][name], value):
                        diff = np.abs(m[key][name].astype(np.float64) - value).max()
                        problems.append(f"{key} {name}: replicas on tensor-parallel ranks {first['rank']} and "
                                        f"{m['rank']} not bit-identical, max diff {diff:.3e}")
                joined[key][name] = value
        merged.append(joined)
    assert not problems, "tensor-parallel ranks disagree:\n  " + "\n  ".join(problems[:20])
    return merged


# --------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------

# Relative tolerance 1e-6 is ~8 fp32 ulps: room for the different summation
# orders (micro-batch grads accumulated in another order, DP all-reduce, tied
# grad all-reduce) but far below any real scheduling bug.  The absolute floor
# 1e-7 only matters for values near zero (e.g. LayerNorm bias entries that
# start at 0), where a relative bound alone would demand bitwise equality of
# tiny round-off; 1e-7 is still ~1e-6 of the O(0.1) typical weight/loss.
ATOL = 1e-7


def compare(results, reference, rtol=1e-6, atol=ATOL, max_report=20):
    """Assert pipeline ranks match the reference and each other.

    * every rank reports the same per-step losses (DeepSpeed broadcasts the
      DP-averaged loss from the last stage) and they match the reference;
    * every parameter on every rank matches the reference within rtol/atol;
    * copies of one parameter across ranks (DP replicas, mirrored stages)
      are bit-identical;
    * every reference parameter is held by at least one rank.

    All problems are collected and raised as one AssertionError (first
    ``max_report`` lines), each line naming the rank, the parameter and the
    max difference, so one run shows where divergence starts.
    """
    problems = []
    ref_losses = np.asarray(reference["losses"], dtype=np.float64)
    first = results[0]
    for res in results:
        r = res.get("rank")
        got = np.asarray(res["losses"], dtype=np.float64)
        if got.shape != ref_losses.shape:
            problems.append(f"rank {r}: {len(got)} losses, reference has {len(ref_losses)}")
        elif not np.allclose(got, ref_losses, rtol=rtol, atol=atol):
            step = int(np.argmax(np.abs(got - ref_losses)))
            problems.append(f"rank {r}: losses differ from reference, max diff {np.abs(got - ref_losses).max():.3e} "
                            f"at step {step}: {got.tolist()} vs {ref_losses.tolist()}")
        if list(res["losses"]) != list(first["losses"]):
            problems.append(f"rank {r}: losses {res['losses']} not bit-identical to rank {first.get('rank')}'s "
                            f"{first['losses']}")

    seen = {}  # name -> (rank, array) of the first copy
    for res in results:
        r = res.get("rank")
        for name, got in res["params"].items():
            if name not in reference["params"]:
                problems.append(f"parameter {name} on rank {r}: not in reference")
                continue
            want = reference["params"][name]
            if got.shape != want.shape:
                problems.append(f"parameter {name} on rank {r}: shape {got.shape} vs reference {want.shape}")
                continue
            g64, w64 = got.astype(np.float64), want.astype(np.float64)
            diff = np.abs(g64 - w64)
            excess = diff - (atol + rtol * np.abs(w64))
            if np.any(excess > 0):
                i = np.unravel_index(int(np.argmax(excess)), diff.shape)
                problems.append(
                    f"parameter {name} on rank {r}: max diff {diff.max():.3e} vs reference "
                    f"(worst at {tuple(int(k) for k in i)}: {got[i]!r} vs {want[i]!r}; rtol={rtol}, atol={atol})")
            if name in seen:
                r0, a0 = seen[name]
                if not np.array_equal(a0, got):
                    problems.append(f"parameter {name}: copies on rank {r0} and rank {r} not bit-identical, "
                                    f"max diff {np.abs(a0.astype(np.float64) - g64).max():.3e}")
            else:
                seen[name] = (r, got)
    missing = sorted(set(reference["params"]) - set(seen))
    if missing:
        problems.append(f"parameters held by no rank: {missing}")
    if problems:
        more = len(problems) - max_report
        raise AssertionError("pipeline does not match reference:\n  " + "\n  ".join(problems[:max_report]) +
                             (f"\n  ... and {more} more" if more > 0 else ""))
