"""A list of target names with a typo: the matched ones are adapted and the unmatched ones named in a warning."""

import pytest

import lorakit
from lorakit.inject import adapter_hosts
from tests.conftest import tiny_llama


def test_unmatched_list_entries_are_named():
    model = tiny_llama()
    with pytest.warns(UserWarning, match=r"\['v_prj'\] matched no module.*v_proj"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_prj"]))
    assert sorted(p.rsplit(".", 1)[1] for p in adapter_hosts(model)) == ["q_proj", "q_proj"]
