"""Smoke test of the overhead benchmark (timings themselves are not asserted: the figure is
reported by running the benchmark, not by a timed test)."""

from benchmarks import overhead


def test_overhead_benchmark_runs_and_engine_does_its_work(capsys):
    r = overhead.main(["--batch", "2", "--iters", "1", "--warmup", "0", "--threads", "1"])
    assert r["groups"] == 57  # one per conv of ResNet-56 (55 convs + 2 shortcut convs)
    assert r["decaying"] == r["channels"] // 2
    assert r["hook_sec"] > 0 and r["sec_with"] > 0 and r["sec_without"] > 0
    out = capsys.readouterr().out
    assert "median of paired ratios" in out and "engine hooks alone" in out
    assert "control" in out and r["control_paired_ratio"] > 0


def test_overhead_benchmark_without_control(capsys):
    r = overhead.main(["--batch", "2", "--iters", "2", "--warmup", "0", "--threads", "1",
                       "--no-control", "--capture-clean-grads"])
    assert "control_paired_ratio" not in r and len(r["paired_iqr"]) == 2
    assert "control" not in capsys.readouterr().out


def test_overhead_benchmark_self_rectifying_worst_case(capsys):
    # T_len 0: every decaying channel passes T_len, so SR keeps every decaying slice
    r = overhead.main(["--batch", "2", "--iters", "1", "--warmup", "0", "--threads", "1",
                       "--no-control", "--t-len", "0"])
    assert r["t_len"] == 0 and r["hook_sec"] > 0
    assert "T_len 0" in capsys.readouterr().out


def test_overhead_group_builders_vgg_and_vit_layouts():
    import torch
    import torch.nn as nn
    import torchvision

    from dpm_core import DecayConfig, DecayEngine

    # VGG-like: the last conv's group owns k = 4 consecutive input columns of the Linear
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5))
    e = DecayEngine(DecayConfig(steps=3))
    assert overhead.build_groups(cnn, e) == 2
    last = e.group_params(e.groups()[-1])
    assert last[-1] is cnn[8].weight and e.num_channels(e.groups()[-1]) == 6
    # ViT: per encoder layer an MLP group (mlp_dim channels) and a heads group
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2,
                                               num_heads=2, hidden_dim=8, mlp_dim=16)
    e = DecayEngine(DecayConfig(steps=3, self_rectify=True))
    assert overhead.build_vit_groups(vit, e) == 4
    assert e.num_channels("layer0.mlp") == 16 and e.num_channels("layer1.heads") == 2
    opt = torch.optim.SGD(vit.parameters(), lr=0.01)
    e.attach(opt)
    for name in e.groups():
        e.mark(name, [0])
    attn = vit.encoder.layers[0].self_attention
    head0 = attn.in_proj_weight.detach()[[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]].clone()
    head1 = attn.in_proj_weight.detach()[[4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]].clone()
    vit(torch.randn(2, 3, 32, 32)).sum().backward()
    for p in vit.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.zero_()  # only the engine moves the weights
    opt.step()
    w = attn.in_proj_weight.detach()
    l0 = e.state("layer0.heads").l_init[0]
    # head 0 (its q, k, v rows and its out_proj columns) at 2/3 of L_init, head 1 untouched
    got = (w[[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]].square().sum()
           + attn.in_proj_bias.detach()[[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]].square().sum()
           + attn.out_proj.weight.detach()[:, :4].square().sum()).sqrt()
    assert torch.allclose(got, 2 / 3 * l0, rtol=1e-5)
    assert torch.allclose(w[[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]], head0 * 2 / 3, rtol=1e-5)
    assert torch.equal(w[[4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]], head1)
