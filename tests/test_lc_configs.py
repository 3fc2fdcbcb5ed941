"""The small-scale linear classifier of the paper's Table 1 ("LC"): the CIFAR-10/100 and SVHN
configs probe ResNet-18's last stage right after pretraining, and that layer exists and is tapped
whole at 32 px."""
from pathlib import Path

import pytest

from and_dist.config import load_config
from and_dist.eval.probes import Taps
from and_dist.models import build_model

REPO = Path(__file__).parent.parent


@pytest.mark.parametrize("name", ["cifar10_resnet18", "cifar100_resnet18", "svhn_resnet18"])
def test_small_scale_configs_probe_the_last_stage_after_pretraining(name):
    cfg = load_config(name, ["data.source=demo"])           # the data sets are not here
    p = cfg.probe
    assert p.after_train and p.layers == ["layer4"] and p.epochs == 100 and p.batch_norm
    assert "Table 1" in (REPO / "configs" / f"{name}.yaml").read_text()
    model = build_model(cfg.model.arch, cfg.model.low_dim, cfg.data.image_size).eval()
    taps = Taps(model, p.layers, cfg.data.image_size)
    assert taps.dims == {"layer4": 512 * 4 * 4}
    taps.close()
