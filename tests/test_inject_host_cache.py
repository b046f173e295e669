"""adapter_hosts is cached on the model (serving calls it every decode step); the cache must never go stale."""

import copy

import lorakit
from lorakit.inject import adapter_hosts
from tests.conftest import tiny_llama


def _paths(model):
    return sorted(adapter_hosts(model))


def test_cache_follows_inject_merge_and_outside_swaps():
    model = tiny_llama()
    assert _paths(model) == []
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    first = _paths(model)
    assert len(first) == 4 and all(p.endswith(("q_proj", "v_proj")) for p in first)
    assert _paths(model) == first  # served from the cache

    # other code swaps a whole decoder layer for a plain copy: its hosts must disappear from the answer
    plain = tiny_llama().model.layers[0]
    model.model.layers[0] = plain
    assert _paths(model) == [p for p in first if ".layers.1." in p]

    # a deep copy answers with its own modules, not the original's
    clone = copy.deepcopy(model)
    clone_hosts = adapter_hosts(clone)
    original_hosts = adapter_hosts(model)
    assert sorted(clone_hosts) == sorted(original_hosts)
    assert all(clone_hosts[p] is not original_hosts[p] for p in clone_hosts)
    assert all(clone.get_submodule(p) is clone_hosts[p] for p in clone_hosts)

    lorakit.merge_and_unload(model)
    assert _paths(model) == []
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["o_proj"]), adapter="other")
    assert [p.rsplit(".", 1)[1] for p in _paths(model)] == ["o_proj", "o_proj"]


def test_returned_dict_is_a_copy():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    hosts = adapter_hosts(model)
    hosts.clear()
    assert len(adapter_hosts(model)) == 2
