"""measure_costs: parameters, training throughput, peak memory and latency, on the CPU (and CUDA if present).

Sizes are small (32 px, batch 4, a few repeats) so the file runs in about half a minute on two cores.
"""

from __future__ import annotations

import pytest
import torch
from helpers.cuda import requires_cuda

from search.comparison.costs import LATENCY_BATCHES, measure_costs
from search.comparison.results import Costs
from trainables.config import Hyperparameters
from trainables.models import ModelSpec, build_model, count_parameters
from trainables.spec import REFERENCE

C = 3
HP = Hyperparameters(batch_size=4)  # the default augmentation: on, as in a trial
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small machine shared with other work, torch's threads contend for the
    cores and a single call can take ten times as long, which would make the latency comparisons flaky."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spec_of(name: str, **fields) -> ModelSpec:
    return ModelSpec(name, C, img_size=32, pretrained=False, **fields)


def quick_costs(spec: ModelSpec, device: torch.device = CPU) -> Costs:
    """measure_costs with few repeats: enough to test what it returns, not to time a model well."""
    return measure_costs(spec, HP, device, warmup=1, repeats=3, train_steps=2)


@pytest.fixture(scope="module")
def cpu_costs(one_thread):
    """cnn and vit measured once for the tests below: building and timing them is the slow part."""
    return {name: quick_costs(spec_of(name)) for name in ("cnn", "vit")}


def assert_sane(costs: Costs, spec: ModelSpec, device: str) -> None:
    assert costs.parameters == count_parameters(build_model(spec))
    assert costs.device == device
    assert costs.train_images_per_s > 0
    assert set(costs.latency_ms) == set(LATENCY_BATCHES) == {1, 32}
    assert all(ms > 0 for ms in costs.latency_ms.values())
    assert costs.latency_ms[32] > costs.latency_ms[1]  # a batch of 32 takes longer than one image


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_costs_of_the_lightweight_models_on_the_cpu(cpu_costs, name):
    costs = cpu_costs[name]
    assert_sane(costs, spec_of(name), "cpu")
    assert costs.peak_train_memory is None


def test_the_models_differ_in_size(cpu_costs):
    assert cpu_costs["cnn"].parameters != cpu_costs["vit"].parameters


def test_a_reference_is_measured_the_same_way():
    spec = spec_of(REFERENCE, backbone="test_resnet")
    costs = quick_costs(spec)
    assert_sane(costs, spec, "cpu")
    assert costs.peak_train_memory is None


def test_weights_are_never_downloaded(monkeypatch):
    """pretrained=True in the spec is overridden: timing does not depend on the weights' values."""
    import search.comparison.costs as costs_module

    built = []

    def recording_build(spec: ModelSpec):
        built.append(spec)
        return build_model(spec)

    monkeypatch.setattr(costs_module, "build_model", recording_build)
    spec = ModelSpec(REFERENCE, C, 32, backbone="test_resnet", weights_files=(("test_resnet", "/nowhere.pth"),))
    quick_costs(spec)
    assert [(s.pretrained, s.weights_files) for s in built] == [(False, ())]


def test_nonsense_repeats_are_refused():
    with pytest.raises(ValueError, match="repeats"):
        measure_costs(spec_of("vit"), HP, CPU, repeats=0)


@requires_cuda
def test_costs_on_cuda_include_the_peak_training_memory():
    spec = spec_of("vit", vit_depth=2)
    costs = quick_costs(spec, torch.device("cuda"))
    assert_sane(costs, spec, "cuda")
    assert costs.peak_train_memory is not None and costs.peak_train_memory > 0
