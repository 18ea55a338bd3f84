"""The methods table: it agrees with the config, and each method's loss settings are exactly the
keyword arguments of its pure loss (the trainer passes them as ``**config.loss.<method>``)."""

import inspect

import pytest

from distill_jax import config, losses
from distill_jax.methods import METHODS

PURE_LOSS = {
    "flow_matching": losses.flow_matching_loss,
    "rescale": losses.rescale_regression_loss,
    "scm": losses.scm_loss,
    "meanflow": losses.meanflow_loss,
}


def test_the_table_is_the_configs_list_of_methods():
    assert tuple(METHODS) == config.METHODS


@pytest.mark.parametrize("method", config.METHODS)
def test_loss_settings_are_keywords_of_the_pure_loss(method):
    keywords = {
        name
        for name, p in inspect.signature(PURE_LOSS[method]).parameters.items()
        if p.kind == p.KEYWORD_ONLY
    }
    fields = set(config.base_config().loss[method])
    assert fields and fields <= keywords, fields - keywords
    if method in ("scm", "meanflow"):  # the slips switch the same loss's own keywords
        assert not fields & set(losses.paper_slips(method))
        assert set(losses.paper_slips(method)) <= keywords
