import contextlib
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.multiprocessing.reductions import StorageWeakRef

from deepspeed_dualpipe.runtime.autograd import split_backward as sb
from deepspeed_dualpipe.runtime.autograd import saved
from deepspeed_dualpipe.runtime.autograd.saved import releasable
from deepspeed_dualpipe.runtime.autograd.split_backward import SplitBackward, full_backward, module_supports_split

D, V, B = 8, 11, 5


class Stage(nn.Module):
    """Linear, Embedding, LayerNorm, activations, a tied weight used twice, an unused param."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.fc1 = nn.Linear(D, D)
        self.fc2 = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.fc2.weight = self.fc1.weight  # tied
        self.unused = nn.Parameter(torch.randn(3))

    def forward(self, x, ids):
        h = x + self.emb(ids)
        h = torch.nn.functional.gelu(self.fc1(h))
        h = torch.tanh(self.fc2(h))  # tied weight used a second time
        return self.norm(h), torch.relu(self.fc1(x))


def make(seed=0):
    torch.manual_seed(seed)
    m = Stage()
    x = torch.randn(B, D, requires_grad=True)
    ids = torch.randint(0, V, (B, ))
    gy = (torch.randn(B, D), torch.randn(B, D))
    return m, x, ids, gy


def params_of(m):
    return [p for p in m.parameters() if p.requires_grad]


def reference(seed, micro_batches=1, pre_grad=False):
    m, x, ids, gy = make(seed)
    if pre_grad:
        for p in m.parameters():
            p.grad = torch.ones_like(p)
    xs = []
    for k in range(micro_batches):
        xk = (x + k).detach().requires_grad_()
        full_backward(m(xk, ids), gy)
        xs.append(xk.grad)
    return xs, {n: (None if p.grad is None else p.grad.clone()) for n, p in m.named_parameters()}


def assert_grads_equal(m, ref):
    for n, p in m.named_parameters():
        if ref[n] is None:
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-6, atol=1e-6, msg=n)


@pytest.mark.parametrize("split", [True, False])
def test_input_then_weight_part_matches_plain_backward(split):
    ref_x, ref = reference(0)
    m, x, ids, gy = make(0)
    h = SplitBackward.input_part(m(x, ids), gy, (x, ids), params_of(m), split=split)
    assert h.split is split
    torch.testing.assert_close(x.grad, ref_x[0], rtol=1e-6, atol=1e-6)
    assert h.input_grads[0] is x.grad and h.input_grads[1] is None
    if split:
        assert m.fc1.weight.grad is None  # weights wait for the W part
    h.weight_part()
    assert_grads_equal(m, ref)
    assert m.unused.grad is None


def test_fallback_forced_by_split_false_does_everything_in_input_part():
    _, ref = reference(0)
    m, x, ids, gy = make(0)
    h = SplitBackward.input_part(m(x, ids), gy, (x, ids), params_of(m), split=False)
    assert not h.split and "split=False" in h.reason
    assert_grads_equal(m, ref)  # already complete before W
    h.weight_part()  # no-op
    assert_grads_equal(m, ref)


def test_weight_part_accumulates_onto_existing_param_grads():
    ref_x, ref = reference(1, pre_grad=True)
    m, x, ids, gy = make(1)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    x.grad = torch.ones_like(x)
    h = SplitBackward.input_part(m(x, ids), gy, (x, ids), params_of(m))
    torch.testing.assert_close(x.grad, ref_x[0] + 1)
    h.weight_part()
    assert_grads_equal(m, ref)
    torch.testing.assert_close(m.unused.grad, torch.ones(3))  # unused param unchanged


def test_interleaved_fifo_I1_I2_W1_W2_matches_two_plain_backwards():
    ref_x, ref = reference(2, micro_batches=2)
    m, x, ids, gy = make(2)
    handles, xs = [], []
    for k in range(2):
        xk = (x + k).detach().requires_grad_()
        handles.append(SplitBackward.input_part(m(xk, ids), gy, (xk, ids), params_of(m)))
        xs.append(xk)
    for h in handles:
        h.weight_part()
    for xk, rx in zip(xs, ref_x):
        torch.testing.assert_close(xk.grad, rx, rtol=1e-6, atol=1e-6)
    assert_grads_equal(m, ref)


def test_scalar_loss_with_no_output_grads():
    lin = nn.Linear(D, 1)
    x = torch.randn(B, D, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    lin(x2).pow(2).mean().backward()
    ref = [p.grad.clone() for p in lin.parameters()]
    for p in lin.parameters():
        p.grad = None
    SplitBackward.input_part(lin(x).pow(2).mean(), None, x, list(lin.parameters())).weight_part()
    torch.testing.assert_close(x.grad, x2.grad)
    for p, r in zip(lin.parameters(), ref):
        torch.testing.assert_close(p.grad, r)


def test_view_outputs_and_non_leaf_inputs_are_supported():
    lin = nn.Linear(D, 2 * D)
    base = torch.randn(B, D, requires_grad=True)
    x = base * 2  # non-leaf stage input
    a, b = lin(x).chunk(2, dim=1)  # view outputs
    ga, gb = torch.randn(B, D), torch.randn(B, D)
    ref = torch.autograd.grad((a, b), [x, *lin.parameters()], (ga, gb), retain_graph=True)
    h = SplitBackward.input_part((a, b), (ga, gb), x, list(lin.parameters()))
    assert h.split
    torch.testing.assert_close(x.grad, ref[0])
    h.weight_part()
    for p, r in zip(lin.parameters(), ref[1:]):
        torch.testing.assert_close(p.grad, r)


def test_overlapping_param_groups_are_merged_not_backpropagated_twice():
    # torch's grouping may put p2 in two groups for this graph (set-order dependent).
    for seed in range(30):
        torch.manual_seed(seed)
        p1, p2 = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
        x = torch.randn(3, requires_grad=True)
        ref = torch.autograd.grad((((x * p1) * (p1 + p2)) * p2).sum(), [x, p1, p2])
        SplitBackward.input_part((((x * p1) * (p1 + p2)) * p2).sum(), None, x, [p1, p2]).weight_part()
        for t, r in zip([x, p1, p2], ref):
            torch.testing.assert_close(t.grad, r)


def test_inputs_without_grad_fall_back_to_full_backward():
    m, x, ids, gy = make(3)
    x.requires_grad_(False)  # e.g. first stage: nothing to send upstream
    m2 = make(3)[0]
    full_backward(m2(x, ids), gy)
    h = SplitBackward.input_part(m(x, ids), gy, (x, ids), params_of(m))
    assert not h.split and "no input requires grad" in h.reason
    h.weight_part()
    assert_grads_equal(m, {n: p.grad for n, p in m2.named_parameters()})


def test_output_independent_of_inputs_falls_back():
    lin = nn.Linear(D, D)
    bias = nn.Parameter(torch.randn(D))
    x = torch.randn(B, D, requires_grad=True)
    h = SplitBackward.input_part((lin(x), bias * 2), (torch.ones(B, D), torch.ones(D)), x, [*lin.parameters(), bias])
    assert not h.split
    h.weight_part()
    torch.testing.assert_close(bias.grad, torch.full((D, ), 2.0))


def test_a_torch_without_gradient_edges_falls_back(monkeypatch):
    _, ref = reference(4)
    monkeypatch.setattr(sb, "split_available", lambda: False)
    m, x, ids, gy = make(4)
    h = SplitBackward.input_part(m(x, ids), gy, (x, ids), params_of(m))
    assert not h.split
    h.weight_part()
    assert_grads_equal(m, ref)


def test_a_failed_input_pass_falls_back_without_double_counting(monkeypatch):
    _, ref = reference(5)

    def failing_input(roots, inputs, grads):
        for t in inputs:  # scribbles on the input grads, then "fails"
            t.grad = torch.full_like(t, 123.0)
        raise RuntimeError("unsupported graph")

    monkeypatch.setattr(sb, "_input_pass", failing_input)
    m, x, ids, gy = make(5)
    h = SplitBackward.input_part(m(x, ids), gy, (x, ids), params_of(m))
    assert not h.split and "unsupported graph" in h.reason
    h.weight_part()
    assert_grads_equal(m, ref)
    ref_x = reference(5)[0][0]
    torch.testing.assert_close(x.grad, ref_x)


def test_weight_part_releases_graph_state_and_refuses_a_second_call():
    """``h`` is kept only by the linear layer, for its weight gradient: alive after the input part, which needs
    it no more but must leave it for the weight part, and freed by the weight part."""
    lin = nn.Linear(D, D)
    x = torch.randn(B, D, requires_grad=True)
    h = x * 2.0  # a scalar multiply saves nothing: only the linear keeps h
    ref = weakref.ref(h)
    out = torch.sigmoid(lin(h))
    del h
    handle = SplitBackward.input_part(out, torch.ones(B, D), x, list(lin.parameters()))
    del out
    gc.collect()
    assert handle.split and ref() is not None, "the input part freed what the weight part needs"
    handle.weight_part()
    gc.collect()
    assert ref() is None, "the weight part left the layer's saved input alive"
    assert lin.weight.grad is not None
    with pytest.raises(RuntimeError, match="already called"):
        handle.weight_part()


def _gelu_mlp(record=True):
    """x -> lin1 -> gelu -> lin2. gelu keeps its input h for the input gradient only; lin2 keeps gelu's
    output g for its weight gradient. Returns the output and storage weak references to h and g."""
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(D, 64 * D), nn.Linear(64 * D, D)
    x = torch.randn(B, D, requires_grad=True)
    with (releasable() if record else contextlib.nullcontext()):
        h = lin1(x)
        g = torch.nn.functional.gelu(h)
        y = lin2(g)
    refs = StorageWeakRef(h.untyped_storage()), StorageWeakRef(g.untyped_storage())
    return y, x, [*lin1.parameters(), *lin2.parameters()], refs


def test_the_input_part_frees_what_only_the_input_gradients_read_and_the_weight_part_frees_the_rest():
    y, x, params, (h, g) = _gelu_mlp()
    handle = SplitBackward.input_part(y, torch.ones_like(y), x, params)
    del y
    gc.collect()
    assert handle.split and handle.released >= B * 64 * D * 4
    assert h.expired()  # gelu's input: read by the input gradient only
    assert not g.expired()  # lin2's input: its weight gradient needs it
    handle.weight_part()
    gc.collect()
    assert g.expired()
    with pytest.raises(RuntimeError, match="already called"):
        handle.weight_part()


def test_the_weight_part_frees_the_whole_graph_and_without_a_recorded_forward_nothing_goes_before():
    y, x, params, (h, g) = _gelu_mlp(record=False)
    handle = SplitBackward.input_part(y, torch.ones_like(y), x, params)
    del y
    gc.collect()
    assert handle.released == 0 and not h.expired() and not g.expired()
    handle.weight_part()
    gc.collect()
    assert h.expired() and g.expired()


def test_released_saved_tensors_do_not_change_the_numbers():
    y, x, params, _ = _gelu_mlp()
    ref_y, ref_x, ref_params, _ = _gelu_mlp(record=False)
    ref_y.sum().backward()
    handle = SplitBackward.input_part(y, torch.ones_like(y), x, params)
    handle.weight_part()
    torch.testing.assert_close(x.grad, ref_x.grad)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.grad, r.grad)


def test_outputs_may_be_given_as_gradient_edges_so_the_caller_need_not_keep_them():
    y, x, params, _ = _gelu_mlp()
    ref_y, ref_x, ref_params, _ = _gelu_mlp(record=False)
    ref_y.sum().backward()
    edge, ones = get_gradient_edge(y), torch.ones_like(y)
    out = StorageWeakRef(y.untyped_storage())
    del y
    gc.collect()
    assert out.expired()
    handle = SplitBackward.input_part(edge, ones, x, params, set_input_grads=False)
    assert x.grad is None
    torch.testing.assert_close(handle.take_input_grads()[0], ref_x.grad)
    assert handle.input_grads is None
    handle.weight_part()
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.grad, r.grad)


def test_module_supports_split_finds_opt_out_in_submodules():

    class Custom(nn.Linear):
        supports_split_backward = False

    assert module_supports_split(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert not module_supports_split(nn.Sequential(nn.Linear(2, 2), nn.Sequential(Custom(2, 2))))
    assert not module_supports_split([nn.Linear(2, 2), Custom(2, 2)])


# --- custom autograd Functions: one backward, weight gradients deferred through the weight store ----------------


def _custom_model():
    from tests.helpers.client import CustomLinearBlock
    torch.manual_seed(0)
    return CustomLinearBlock(6)


def test_a_custom_function_runs_its_backward_once_and_its_deferred_weight_gradient_in_the_weight_part():
    from tests.helpers.client import CALLS
    model, reference = _custom_model(), _custom_model()
    x = torch.randn(3, 6)
    reference(x.clone().requires_grad_()).sum().backward()
    CALLS.update(forward=0, backward=0)
    inp = x.clone().requires_grad_()
    out = model(inp)
    handle = sb.SplitBackward.input_part(out, torch.ones_like(out), [inp], list(model.parameters()))
    assert handle.reason is None and handle.split  # the Functions hold their weights: the rest is still split
    assert CALLS == {"forward": 2, "backward": 2}
    assert model.w1.grad is None and model.w2.grad is None  # deferred through the weight store
    assert model.norm.weight.grad is None  # a built-in op's weight gradient: deferred by the split
    handle.weight_part()
    assert CALLS["backward"] == 2
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7)


class _PureLinear(torch.autograd.Function):
    """``x @ weight.t()`` returning both gradients to autograd (pure: torch's split may run it in both parts)."""
    dualpipe_split_safe = True

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        return grad_output @ weight, grad_output.t() @ x


def test_a_function_marked_split_safe_is_split_like_builtin_ops():
    Safe = _PureLinear
    torch.manual_seed(0)
    w, x = torch.nn.Parameter(torch.randn(4, 4)), torch.randn(2, 4)

    def forward(inp):
        return torch.tanh(Safe.apply(inp, w) + inp @ w)  # w also reaches the output through a built-in matmul

    inp = x.clone().requires_grad_()
    forward(inp).sum().backward()  # the reference: one whole backward
    want_input, want_weight = inp.grad, w.grad
    w.grad, inp = None, x.clone().requires_grad_()
    out = forward(inp)
    handle = sb.SplitBackward.input_part(out, torch.ones_like(out), [inp], [w])
    assert handle.split and handle.reason is None
    assert w.grad is None  # deferred, the custom Function's share as the matmul's
    torch.testing.assert_close(inp.grad, want_input)
    handle.weight_part()
    torch.testing.assert_close(w.grad, want_weight)  # both paths' shares, each once


class _HandLinear(torch.autograd.Function):
    """``x @ weight.t()`` whose weight gradient is accumulated into ``weight.grad`` by hand, as Megatron's linear."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        g = grad_output.t() @ x
        weight.grad = g if weight.grad is None else weight.grad + g
        return grad_output @ weight, None


def _hand_step(policy, weight):
    x = torch.randn(B, D, requires_grad=True)
    with policy.recording("block"):
        y = _HandLinear.apply(x * 1.0, weight)
    policy.learn("block", y)
    weight.grad = None
    SplitBackward.input_part(y, torch.ones_like(y), x, [weight]).weight_part()
    return weight.grad, torch.ones(B, D).t() @ x.detach()


def test_a_custom_function_that_sets_its_weights_grad_is_never_recorded_so_the_gradient_reaches_the_parameter():
    """Under saved-tensor hooks autograd hands a custom Function an alias of each saved parameter, whose ``.grad``
    nobody reads: a Policy records such a forward never (and a plain one from its second forward on)."""
    policy, weight = saved.Policy(), nn.Parameter(torch.randn(D, D))
    for _ in range(2):
        got, want = _hand_step(policy, weight)
        torch.testing.assert_close(got, want)
    always = saved.Policy()
    always.learn = lambda key, outputs: always._allowed.setdefault(key, True)  # planted: records everything
    _hand_step(always, weight)
    assert _hand_step(always, weight)[0] is None  # the gradient went to an alias


def test_a_policy_records_a_forward_of_built_in_ops_from_its_second_run():
    policy = saved.Policy()
    lin = nn.Linear(D, D)
    x = torch.randn(B, D, requires_grad=True)
    for recorded in (False, True):
        context = policy.recording("lin")
        assert isinstance(context, torch.autograd.graph.saved_tensors_hooks) == recorded
        with context:
            y = torch.sigmoid(lin(x))
        policy.learn("lin", y)


# --- fused kernels (apex's RMSNorm): their parameters' gradients in the input part, the rest still deferred ------


def _fused_island(seed=0):
    from tests.helpers.apex_stand_in import FusedRMSNorm
    torch.manual_seed(seed)
    return nn.ModuleDict({"norm": FusedRMSNorm(D), "fc": nn.Linear(D, D)})


def test_a_fused_norm_computes_its_weight_gradient_in_the_input_part_while_the_linear_beside_it_is_deferred():
    from tests.helpers.apex_stand_in import USED
    island, reference = _fused_island(), _fused_island()
    x, gy = torch.randn(B, D), torch.randn(B, D)
    full_backward(reference.fc(torch.tanh(reference.norm(x.clone().requires_grad_()))), gy)
    USED["norm_backwards"] = 0
    inp = x.clone().requires_grad_()
    out = island.fc(torch.tanh(island.norm(inp)))
    handle = SplitBackward.input_part(out, gy, [inp], list(island.parameters()))
    assert handle.split and handle.reason is None
    assert island.norm.weight.grad is not None  # computed by the kernel's one backward
    assert island.fc.weight.grad is None and island.fc.bias.grad is None  # the GEMM's weight gradient: deferred
    handle.weight_part()
    assert USED["norm_backwards"] == 1
    for p, q in zip(island.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_a_custom_function_that_holds_no_parameter_still_makes_its_graph_run_whole():

    class Opaque(torch.autograd.Function):  # e.g. a reentrant checkpoint: parameters out of the graph's sight

        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    fc = nn.Linear(D, D)
    inp = torch.randn(B, D, requires_grad=True)
    out = fc(Opaque.apply(inp))
    handle = SplitBackward.input_part(out, torch.ones(B, D), [inp], list(fc.parameters()))
    assert not handle.split and "custom autograd Function Opaque" in handle.reason
    assert fc.weight.grad is not None
