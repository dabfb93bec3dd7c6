"""The loss over a process group (gloo, CPU) against one process on the concatenated batch.

Each test spawns its ranks once (spawning is the slow part) and runs many checks in them. Every
rank builds the same global inputs from one seed, takes its slice, and compares the value and the
gradients (divided by world size: the convention DDP's averaging undoes) with a single-process
call on the whole batch. That single-process call is itself compared with the float64 oracle
(tests/oracle.py, the presets' calls included), so a fault shared by both paths fails too.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import assert_close, unit_rows
from oracle_compare import assert_single_matches_oracle

from acl_kernels import ACLLoss, GPaCoLoss, PaCoLoss, SupConLoss, contrastive_loss
from acl_kernels.dispatch import backends
from acl_kernels.functional import GROUP_SETTINGS

RTOL = 1e-5
# the native kernel when this install has it (tests/test_core.py fails an install that should have it)
NATIVE = () if backends()["native"].missing else ("native",)
IMPLS = ("torch", "reference", *NATIVE)


def slices(sizes):
    out, start = [], 0
    for n in sizes:
        out.append(slice(start, start + n))
        start += n
    return out


def local_leaf(x, rows):
    return x.detach()[rows].clone().requires_grad_()


def check_grads(world, pairs):
    """pairs: (name, distributed local leaf, global leaf, rows of the local leaf in the global one)."""
    for name, mine, full, rows in pairs:
        assert mine.grad is not None, f"{name}: no gradient"
        assert_close(mine.grad / world, full.grad[rows], RTOL, name)


# ---------------------------------------------------------------- presets vs one process


def case_supcon(rank, world, gen, impl, sizes, mode):
    views, d = 2, 16
    own = slices(sizes)[rank]
    feats = unit_rows(sum(sizes), views, d, generator=gen).requires_grad_()
    labels = torch.randint(0, 4, (sum(sizes),), generator=gen)
    kw = {"temperature": 0.1, "contrast_mode": mode, "impl": impl}

    def single(core, f):
        return SupConLoss(**kw)(f, labels)

    full = single(contrastive_loss, feats)
    full.backward()
    assert_single_matches_oracle(f"supcon {mode} {impl}", single, [feats], ["dz"], [full, feats.grad])
    mine = local_leaf(feats, own)
    got = SupConLoss(**kw, process_group=dist.group.WORLD)(mine, labels[own])
    got.backward()
    assert_close(got, full, RTOL, f"supcon {mode} loss")
    check_grads(world, [(f"supcon {mode} features", mine, feats, own)])
    if mode == "all":  # SimCLR: no labels, every image its own class across ranks
        feats.grad = None

        def simclr(core, f):
            return SupConLoss(**kw)(f)

        full = simclr(contrastive_loss, feats)
        full.backward()
        assert_single_matches_oracle(f"simclr {impl}", simclr, [feats], ["dz"], [full, feats.grad])
        mine = local_leaf(feats, own)
        got = SupConLoss(**kw, process_group=dist.group.WORLD)(mine)
        got.backward()
        check_grads(world, [("simclr features", mine, feats, own)])


def case_paco(rank, world, gen, impl, sizes, gpaco):
    c, d, k = 7, 12, 10
    own = slices(sizes)[rank]
    b = sum(sizes)
    q, key = unit_rows(b, d, generator=gen).requires_grad_(), unit_rows(b, d, generator=gen).requires_grad_()
    queue = unit_rows(k, d, generator=gen)
    y, y_queue = torch.randint(0, c, (b,), generator=gen), torch.randint(0, c, (k,), generator=gen)
    # anchors: PaCo the queries, GPaCo every in-batch row [q; k]; sup_logits has one row per anchor
    sup = torch.randn(2 * b if gpaco else b, c, generator=gen).requires_grad_()
    counts = torch.randint(1, 300, (c,), generator=gen).tolist()
    cls, extra = (GPaCoLoss, {"smooth": 0.1}) if gpaco else (PaCoLoss, {})
    kw = {"alpha": 0.05, "beta": 1.0, "gamma": 0.8, "supt": 1.5, "temperature": 0.2, "K": k, "num_classes": c}

    def loss(group):
        m = cls(**kw, **extra, impl=impl, process_group=group)
        m.cal_weight_for_classes(counts)
        return m

    def single(core, q, key, sup):
        return loss(None)(torch.cat([q, key, queue.to(q.dtype)]), torch.cat([y, y, y_queue]), sup)

    full = single(contrastive_loss, q, key, sup)
    full.backward()
    got = [full, q.grad, key.grad, sup.grad]
    assert_single_matches_oracle(f"{cls.__name__} {impl}", single, [q, key, sup], ["dz", "dz", "du"], got)
    mq, mk = local_leaf(q, own), local_leaf(key, own)
    if gpaco:  # sup_logits rows follow the in-batch rows [q_r; k_r]
        msup = torch.cat([sup.detach()[own], sup.detach()[b:][own]]).requires_grad_()
    else:
        msup = local_leaf(sup, own)
    got = loss(dist.group.WORLD)(torch.cat([mq, mk, queue]), torch.cat([y[own], y[own], y_queue]), msup)
    got.backward()
    name = "gpaco" if gpaco else "paco"
    assert_close(got, full, RTOL, f"{name} loss")
    check_grads(world, [(f"{name} q", mq, q, own), (f"{name} k", mk, key, own)])
    expected_sup = torch.cat([sup.grad[own], sup.grad[b:][own]]) if gpaco else sup.grad[own]
    assert_close(msup.grad / world, expected_sup, RTOL, f"{name} sup_logits")


def case_acl(rank, world, gen, impl, sizes, weighting):
    c, d, views, k = 5, 12, 3, 6
    own = slices(sizes)[rank]
    b = sum(sizes)
    feats = unit_rows(b, views, d, generator=gen).requires_grad_()
    labels = torch.randint(0, c, (b,), generator=gen)
    sup = torch.randn(b, views, c, generator=gen).requires_grad_()
    queue, y_queue = unit_rows(k, d, generator=gen), torch.randint(0, c, (k,), generator=gen)
    counts = torch.randint(1, 300, (c,), generator=gen).tolist()

    def loss(group):
        m = ACLLoss(
            c, temperature=0.15, alpha=0.3, negative_weight=weighting, kappa=0.7, impl=impl, process_group=group
        )
        m.cal_weight_for_classes(counts)
        return m

    def single(core, f, s):
        return loss(None)(f, labels, s, queue.to(f.dtype), y_queue)

    full = single(contrastive_loss, feats, sup)
    full.backward()
    got = [full, feats.grad, sup.grad]
    assert_single_matches_oracle(f"acl {weighting} {impl}", single, [feats, sup], ["dz", "du"], got)
    mine, msup = local_leaf(feats, own), local_leaf(sup, own)
    got = loss(dist.group.WORLD)(mine, labels[own], msup, queue, y_queue)
    got.backward()
    assert_close(got, full, RTOL, f"acl {weighting} loss")
    check_grads(world, [(f"acl {weighting} features", mine, feats, own), (f"acl {weighting} sup", msup, sup, own)])


def case_functional_none(rank, world, gen, impl, sizes):
    """reduction='none' under a random upstream gradient: the gathered upstream of every anchor."""
    d, c = 8, 3
    rows = [2 * n for n in sizes]  # n anchors then n other rows per rank
    z_a = unit_rows(sum(sizes), d, generator=gen).requires_grad_()
    z_b = unit_rows(sum(sizes), d, generator=gen).requires_grad_()
    y_a, y_b = torch.randint(0, c, (sum(sizes),), generator=gen), torch.randint(0, c, (sum(sizes),), generator=gen)
    u = torch.randn(sum(sizes), c, generator=gen).requires_grad_()
    up = torch.randn(sum(sizes), generator=gen)
    kw = {"mode": "aligned", "temperature": 0.2, "negative_weight": "batch", "reduction": "none", "impl": impl}

    def single(core, z_a, z_b, u):
        return core(torch.cat([z_a, z_b]), torch.cat([y_a, y_b]), n_anchor=sum(sizes), centre_logits=u, **kw)

    full = single(contrastive_loss, z_a, z_b, u)
    full.backward(up)
    got = [full, z_a.grad, z_b.grad, u.grad]
    assert_single_matches_oracle(f"none {impl}", single, [z_a, z_b, u], ["dz", "dz", "du"], got, up)
    own = slices(sizes)[rank]
    ma, mb, mu = local_leaf(z_a, own), local_leaf(z_b, own), local_leaf(u, own)
    got = contrastive_loss(
        torch.cat([ma, mb]),
        torch.cat([y_a[own], y_b[own]]),
        n_anchor=sizes[rank],
        centre_logits=mu,
        process_group=dist.group.WORLD,
        **kw,
    )
    assert got.shape == (sizes[rank],)
    assert_close(got, full[own], RTOL, "none losses")
    got.backward(up[own])
    check_grads(world, [("none anchors", ma, z_a, own), ("none others", mb, z_b, own), ("none centres", mu, u, own)])
    assert rows[rank] == ma.shape[0] + mb.shape[0]


CASES = [
    (case_supcon, {"mode": "all"}),
    (case_supcon, {"mode": "one"}),
    (case_paco, {"gpaco": False}),
    (case_paco, {"gpaco": True}),
    (case_acl, {"weighting": "batch"}),
    (case_acl, {"weighting": "prior"}),
    (case_functional_none, {}),
]


def check_against_one_process(rank, world, seed, sizes):
    for impl in IMPLS:
        for i, (case, kw) in enumerate(CASES):
            case(rank, world, torch.Generator().manual_seed(seed + i), impl, sizes, **kw)


def check_half(rank, world, seed, sizes):
    """bf16 rows travel as bf16 and are accumulated in fp32: only summation order and the bf16
    rounding of the gradient differ from one process."""
    gen = torch.Generator().manual_seed(seed)
    own = slices(sizes)[rank]
    feats = unit_rows(sum(sizes), 2, 32, dtype=torch.bfloat16, generator=gen).requires_grad_()
    labels = torch.randint(0, 3, (sum(sizes),), generator=gen)

    def single(core, f):
        return SupConLoss(temperature=0.1, impl="torch")(f, labels)

    full = single(contrastive_loss, feats)
    full.backward()
    assert_single_matches_oracle("bf16 supcon", single, [feats], ["dz"], [full, feats.grad])
    mine = local_leaf(feats, own)
    got = SupConLoss(temperature=0.1, impl="torch", process_group=dist.new_group())(mine, labels[own])
    got.backward()
    assert mine.grad.dtype == torch.bfloat16
    assert_close(got, full, 1e-5, "bf16 loss")
    assert_close(mine.grad.float() / world, feats.grad[own].float(), 1e-2, "bf16 features")


# ---------------------------------------------------------------- a DDP step


def check_ddp_step(rank, world, seed, sizes):
    """One SGD step of a tiny DDP model equals the single-process step on the concatenated batch."""
    c, d_in, d, views = 4, 10, 6, 2
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), views, d_in, generator=gen)
    y = torch.randint(0, c, (sum(sizes),), generator=gen)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(d_in, 16)
            self.head = torch.nn.Linear(16, d)
            self.fc = torch.nn.Linear(16, c)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return F.normalize(self.head(h), dim=-1), self.fc(h)

    for impl in IMPLS:
        torch.manual_seed(seed)
        single = Net()
        ddp_net = Net()
        ddp_net.load_state_dict(single.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(ddp_net)
        for net, group, rows in ((single, None, slice(None)), (ddp, dist.group.WORLD, slices(sizes)[rank])):
            opt = torch.optim.SGD(net.parameters(), lr=0.5)
            feats, logits = net(x[rows])
            loss = ACLLoss(c, temperature=0.2, impl=impl, process_group=group)(feats, y[rows], logits)
            loss.backward()
            opt.step()
        for (name, a), b in zip(single.named_parameters(), ddp_net.parameters()):
            assert_close(b, a, RTOL, f"DDP step {impl}: {name}")


# ---------------------------------------------------------------- errors


def expect_error(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def check_errors(rank, world, seed):
    group = dist.group.WORLD
    z = unit_rows(4, 8)
    y = torch.tensor([0, 1, 0, 1])

    def call(**kw):
        args = {"features": z, "labels": y, "temperature": 0.1, "process_group": group, "impl": "torch"} | kw
        return contrastive_loss(args.pop("features"), args.pop("labels"), **args)

    expect_error(lambda: call(temperature=0.1 + 0.1 * rank), "disagree on temperature")
    expect_error(lambda: call(features=unit_rows(4, 8 + rank)), "feature dimension d")
    expect_error(lambda: call(features=unit_rows(4, 8, dtype=torch.float64 if rank else torch.float32)), "dtype")
    expect_error(lambda: call(mode="aligned" if rank else "softmax"), "disagree on mode")
    # a rank whose own checks fail raises its error; the others learn of it instead of waiting
    bad = torch.tensor([0, 1, 0, -1]) if rank == 1 else y
    expect_error(lambda: call(labels=bad), "labels must be >= 0" if rank == 1 else r"rank\(s\) \[1\] failed")
    queue = unit_rows(3, 8).requires_grad_()
    expect_error(lambda: call(queue=queue, queue_labels=torch.tensor([0, 1, 1])), "queue.detach")
    expect_error(lambda: SupConLoss(process_group=group)(z.view(4, 1, 8), mask=torch.eye(4)), "mask")
    expect_error(lambda: call(impl="triton"), "impl=.triton. cannot compute")  # CPU tensors without the interpreter
    assert torch.isfinite(call())  # the group still works after the errors


# ---------------------------------------------------------------- communication volume


class CountingCollectives:
    """Wraps torch.distributed's collectives: bytes each rank receives, per collective."""

    NAMES = (
        "all_gather",
        "all_gather_into_tensor",
        "all_reduce",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "broadcast",
        "all_to_all",
        "all_to_all_single",
        "gather",
        "scatter",
        "reduce",
    )

    def __init__(self):
        self.bytes = {}
        self.saved = {}

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(dist, name)
            self.saved[name] = original

            def wrapped(*args, _name=name, _original=original, **kw):
                out = args[0]
                tensors = out if isinstance(out, list) else [out]
                self.bytes[_name] = self.bytes.get(_name, 0) + sum(t.numel() * t.element_size() for t in tensors)
                return _original(*args, **kw)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(dist, name, original)


def check_volume(rank, world, seed, sizes):
    """impl='torch' (and 'native') sends O(N d + N) bytes: the formula of acl_kernels.distributed, exactly."""
    gen = torch.Generator().manual_seed(seed)
    c, d, views = 5, 24, 2
    b = sizes[rank]
    feats = unit_rows(b, views, d, generator=gen).requires_grad_()
    sup = torch.randn(b, views, c, generator=gen).requires_grad_()
    labels = torch.randint(0, c, (b,), generator=gen)
    n_hat, a_hat = views * max(sizes), views * max(sizes)  # every row is an anchor
    s = c_bytes = 4  # fp32 features and statistics
    fields = 5 + len(GROUP_SETTINGS)
    expected = world * (8 * fields + n_hat * (d * s + 4) + 5 * a_hat * c_bytes) + world * a_hat * c_bytes
    for impl in ("torch", *NATIVE):
        with CountingCollectives() as count:
            ACLLoss(c, impl=impl, process_group=dist.group.WORLD)(feats, labels, sup).backward()
        assert count.bytes == {"all_gather": expected}, (impl, count.bytes, expected)


# ---------------------------------------------------------------- launch


def _worker(rank, world, store, seed, checks):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for name, args in checks:
            globals()[name](rank, world, seed, *args)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(world, tmp_path, seed, checks):
    mp.start_processes(
        _worker, args=(world, str(tmp_path / "store"), seed, checks), nprocs=world, join=True, start_method="spawn"
    )


@pytest.fixture
def seed(rng):
    return int(torch.randint(0, 2**31 - 1, (1,), generator=rng))


def test_two_processes(tmp_path, seed):
    sizes = [5, 3]  # uneven local batches
    spawn(
        2,
        tmp_path,
        seed,
        [
            ("check_against_one_process", (sizes,)),
            ("check_ddp_step", (sizes,)),
            ("check_volume", (sizes,)),
            ("check_half", (sizes,)),
            ("check_errors", ()),
        ],
    )


def test_three_processes(tmp_path, seed):
    sizes = [4, 1, 3]  # a rank with a single image
    spawn(
        3,
        tmp_path,
        seed,
        [
            ("check_against_one_process", (sizes,)),
            ("check_ddp_step", (sizes,)),
            ("check_volume", (sizes,)),
        ],
    )
