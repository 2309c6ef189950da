"""fastreg.convert: every supported torch module swapped for its drop-in, nothing else touched."""

import copy

import pytest
import torch

import fastreg
from fastreg._convert import _DROP_INS


class Block(torch.nn.Module):
    """A nested module holding one of each converted type (and a user subclass)."""

    class MyDropout(torch.nn.Dropout):  # a user's subclass: not an exact type, left alone
        pass

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.gn = torch.nn.GroupNorm(4, 8)
        self.in2 = torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.drop2 = torch.nn.Dropout2d(0.2)
        self.bn3 = torch.nn.BatchNorm3d(8)
        self.in3 = torch.nn.InstanceNorm3d(8)
        self.drop3 = torch.nn.Dropout3d(0.1)
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 16), torch.nn.LayerNorm(16), torch.nn.Dropout(0.3),
            torch.nn.RMSNorm(16), Block.MyDropout(0.1), torch.nn.Unflatten(1, (4, 4)),
            torch.nn.InstanceNorm1d(4), torch.nn.Dropout1d(0.1), torch.nn.BatchNorm1d(4),
            torch.nn.SyncBatchNorm(4),  # plain BatchNorm outside a process group
        )

    def forward(self, x):
        x = self.drop2(self.in2(self.gn(self.bn2(self.conv(x)))))
        x = self.drop3(self.in3(self.bn3(x.unsqueeze(2)))).squeeze(2)
        return self.head(x)


def _model():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(6, 3, 4, 4)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(2):
            model(x)
    return model, x


def test_every_drop_in_exists():
    for torch_type, name in _DROP_INS.items():
        assert fastreg._convert.drop_in_for(torch_type) is getattr(fastreg.nn, name)


def test_converts_every_type_keeping_state_and_outputs():
    model, x = _model()
    reference = copy.deepcopy(model)
    params = {name: p for name, p in model.named_parameters()}
    model.eval()
    reference.eval()
    assert fastreg.convert(model, verbose=False) is model
    converted = {type(m) for m in model.modules()}
    assert set(_DROP_INS) & converted == set()  # no exact torch type left
    assert Block.MyDropout in converted
    for name, module in model.named_modules():
        if type(reference.get_submodule(name)) in _DROP_INS:
            assert type(module).__module__.startswith("fastreg.nn")
            assert isinstance(module, type(reference.get_submodule(name)))
            assert not module.training
    # parameters are the same objects (an optimizer built earlier keeps working)
    assert all(p is params[name] for name, p in model.named_parameters())
    assert model.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_training_continues_like_torch_without_dropout():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.LayerNorm(8),
                                torch.nn.Dropout(0.0), torch.nn.Linear(8, 1))
    reference = copy.deepcopy(model)
    fastreg.convert(model, verbose=False)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference)]
    for _ in range(3):
        x = torch.randn(16, 5)
        for m, opt in zip((model, reference), optimizers):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_include_and_exclude(capsys):
    model, _ = _model()
    fastreg.convert(model, exclude=["head", torch.nn.GroupNorm])
    assert "replaced" in capsys.readouterr().out
    assert type(model.gn) is torch.nn.GroupNorm
    assert type(model.head[2]) is torch.nn.LayerNorm  # under an excluded name
    assert type(model.bn2) is fastreg.nn.BatchNorm2d

    model, _ = _model()
    fastreg.convert(model, include=["Dropout2d", "head.2"], verbose=False)
    assert type(model.drop2) is fastreg.nn.Dropout2d and type(model.head[2]) is fastreg.nn.LayerNorm
    assert type(model.bn2) is torch.nn.BatchNorm2d and type(model.head[3]) is torch.nn.Dropout

    model, _ = _model()
    fastreg.convert(model, exclude=lambda name, module: name.startswith("bn"), verbose=False)
    assert type(model.bn2) is torch.nn.BatchNorm2d and type(model.bn3) is torch.nn.BatchNorm3d
    assert type(model.head[9]) is fastreg.nn.BatchNorm1d


@pytest.mark.parametrize("module", [torch.nn.Linear(2, 2), torch.nn.Sequential()])
def test_nothing_to_convert(module, capsys):
    assert fastreg.convert(module) is module
    assert "replaced nothing" in capsys.readouterr().out
