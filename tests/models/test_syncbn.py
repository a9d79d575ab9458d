"""GlobalBatchNorm (sync_bn on CPU) on 2 gloo processes against one process's BatchNorm on the whole batch."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fgclf.models import GlobalBatchNorm, convert_sync_batchnorm, count_batchnorms


def _net() -> nn.Module:
    import timm

    torch.manual_seed(0)
    # a timm BatchNormAct2d (with its activation) and a plain BatchNorm1d
    return nn.Sequential(nn.Conv2d(3, 4, 3), timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU), nn.Flatten(1),
                         nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5))


def _step(model: nn.Module, x: torch.Tensor, scale: float) -> tuple:
    """Two training steps of SGD; returns outputs, input grad, final weights and buffers."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = x.clone().requires_grad_(True)
    outs = []
    for _ in range(2):
        y = model(x)
        loss = (y * torch.arange(5.0)).pow(2).mean() * scale  # each process: the mean over its half
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():  # what DDP does: average the gradients over processes
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(p.grad)
                p.grad /= torch.distributed.get_world_size()
        opt.step()
        outs.append(y.detach())
    return torch.cat(outs, 1), x.grad, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, x: torch.Tensor, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = convert_sync_batchnorm(_net(), "cpu")
        assert sum(isinstance(m, GlobalBatchNorm) for m in model.modules()) == 2
        y, grad, state = _step(model, x.chunk(2)[rank], scale=1.0)
        # numpy: plain pickles (torch would pass shared-memory handles that die with this process)
        queue.put((rank, y.numpy(), grad.numpy(), {k: v.numpy() for k, v in state.items()}))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_global_batchnorm_equal_one_process_on_the_whole_batch():
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 3 + 1
    y1, grad1, state1 = _step(_net(), x, scale=1.0)
    ctx = mp.get_context("spawn")  # fork after torch ran ops can hang in OpenMP
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, x, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, rest) for r, *rest in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    results = {r: (torch.from_numpy(y), torch.from_numpy(g), {k: torch.from_numpy(v) for k, v in st.items()})
               for r, (y, g, st) in results.items()}
    y2 = torch.cat([results[0][0], results[1][0]], 0)
    # the input gradient of the whole-batch loss = sum over processes of their (half-batch) gradients / 2
    grad2 = torch.cat([results[0][1], results[1][1]], 0) / 2
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad2, grad1, atol=1e-6, rtol=1e-5)
    for key, value in state1.items():  # weights after 2 updates and running statistics, on both processes
        for r in (0, 1):
            torch.testing.assert_close(results[r][2][key].to(value.dtype), value, atol=1e-5, rtol=1e-5, msg=key)


def test_conversion_keeps_weights_activation_and_eval_behaviour():
    net = _net().eval()
    x = torch.randn(4, 3, 8, 8)
    expected = net(x)
    converted = convert_sync_batchnorm(net, "cpu")
    assert count_batchnorms(converted) == 2 and isinstance(converted[1].act, nn.ReLU)
    assert set(converted.state_dict()) == set(_net().state_dict())  # checkpoints keep their keys
    torch.testing.assert_close(converted(x), expected)  # eval: running statistics, activation applied
    converted.train()
    torch.testing.assert_close(converted(x), _net().train()(x))  # one process: the ordinary kernel


def test_sync_bn_needs_batchnorm():
    assert count_batchnorms(nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2))) == 0


@pytest.mark.parametrize("momentum", [None])
def test_cumulative_average_momentum(momentum):
    bn = GlobalBatchNorm(3, momentum=momentum)
    ref = nn.BatchNorm1d(3, momentum=momentum)
    for _ in range(3):
        x = torch.randn(6, 3)
        bn(x), ref(x)
    torch.testing.assert_close(bn.running_var, ref.running_var)
