"""The task base class hands each network the arguments of the ``model`` section it names."""

from __future__ import annotations

import inspect

import pytest
from omegaconf import OmegaConf

from tasks.app.module import arguments_of
from tasks.classification.config import ModelConfig as ClassificationModel
from tasks.classification.model import Classifier
from tasks.matching.config import ModelConfig as MatchingModel
from tasks.matching.model import MatchingNet


def test_arguments_of_keeps_the_named_parameters():
    def net(width: int, pool: str = "avg") -> None: ...

    assert arguments_of(net, {"width": 4, "pool": "max", "dropout": 0.1}) == {
        "width": 4,
        "pool": "max",
    }


@pytest.mark.parametrize(
    ("network", "from_data", "schema"),
    [
        (Classifier, {"num_classes", "in_channels"}, ClassificationModel),
        (MatchingNet, {"descriptor_dim"}, MatchingModel),
    ],
)
def test_every_network_argument_is_a_model_key(network, from_data, schema):
    # a network argument missing from the schema would silently keep its default
    arguments = set(inspect.signature(network).parameters) - from_data
    assert arguments <= set(OmegaConf.structured(schema).keys())
