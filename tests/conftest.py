from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
SMALL_MODEL = {"model#channels": [16, 16, 16], "model#attention_levels": [False, False, False],
               "model#norm_num_groups": 8, "model#num_head_channels": 8}
"""A U-Net small enough for fast CPU tests (bundle ids)."""


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained :data:`SMALL_MODEL` HyperNetwork saved as training saves ``model.pt``."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.yaml"), str(CONFIGS / "inference.yaml")])
    parser.update({**SMALL_MODEL, "device": "$torch.device('cpu')"})
    torch.manual_seed(0)  # module fixtures run before the autouse seeding
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"hypernet": parser.get_parsed_content("network").state_dict()}, path)
    return path
