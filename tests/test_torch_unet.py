"""The PyTorch port of the UNet (``benchmarks/torch_unet.py``, the speed reference of
``benchmarks/train_step.py --torch``): same parameter count as the Flax net, right output shape.

torch is an optional extra (``pip install '.[torch-bench]'``) that CI does not install, so the
whole module is skipped without it.
"""

import pytest

torch = pytest.importorskip(
    "torch", reason="torch is the optional extra torch-bench (speed reference only); not installed"
)

from benchmarks import torch_unet  # noqa: E402  (after the importorskip above)
from locality.nets import abstract_params, build_model, count_params  # noqa: E402

CPU = {
    "arch": "unet",
    "ch": 16,
    "ch_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "mid_attn": True,
    "dropout": 0.0,
    "num_groups": 8,
    "padding": "zeros",
    "use_norm": True,
    "num_classes": 0,
}


@pytest.mark.parametrize("ch", [16, 24])
def test_param_count_equals_flax(ch):
    cfg = {**CPU, "ch": ch}
    flax_count = count_params(abstract_params(build_model(cfg), (28, 28, 1)))
    assert torch_unet.count_params(torch_unet.build(cfg, (28, 28, 1))) == flax_count


def test_output_shape():
    net = torch_unet.build(CPU, (28, 28, 1))
    with torch.no_grad():
        y = net(torch.zeros(2, 1, 28, 28), torch.tensor([0.0, 999.0]))
    assert y.shape == (2, 1, 28, 28)


def test_unsupported_configs():
    with pytest.raises(ValueError, match="num_classes"):
        torch_unet.build({**CPU, "num_classes": 10})
    assert "unet" in torch_unet.unsupported({"arch": "dit", "size": "tiny"})
