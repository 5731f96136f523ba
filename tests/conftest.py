import pytest

from cityscapes import synthesize
from convert_labels import convert_dataset


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic Cityscapes with labelTrainIds and split lists. Tests must not modify it."""
    root = tmp_path_factory.mktemp("cityscapes")
    synthesize(root, train=9, val=4, test=2, height=128, width=256, seed=5)
    assert not convert_dataset(root, source="labelIds", progress=False)
    return root
