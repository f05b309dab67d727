"""The lean CPU-speed paths compute what megatron-core's own paths compute.

* ``MegasmoeRouter.lean_routing`` (one softmax over the experts instead of two) against
  megatron's ``TopKRouter.routing`` inside the real model: probabilities, routing maps,
  gradients through the attached aux and z losses, and the logged loss values;
* ``LocalTokenDispatcher`` (megasmoe/moe/dispatch.py) against megatron's alltoall and
  allgather dispatchers at world size 1: the same loss and gradients, bitwise, with
  grouped and sequential experts; and it is chosen only where no token leaves its rank;
* platform P10's linear against megatron's autograd function, on the whole model.

The model work runs in one subprocess (tests/lean_probe.py); the pytest process never
starts torch.distributed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO

PROBE = REPO / "tests" / "lean_probe.py"
VARIANTS = ["mixtral", "pre_softmax", "scaling", "z_loss"]


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("lean") / "lean.json"
    proc = subprocess.run([sys.executable, str(PROBE), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("variant", VARIANTS)
def test_lean_routing_matches_megatron(probe, variant):
    r = probe["routing"][variant]
    assert r["applies"] == [True] * len(r["applies"]) and r["applies"], r["applies"]
    assert r["map_differs"] == 0.0
    # fp32 rounding: the softmax over the transposed view differs by a few ulp.
    assert r["probs"] <= 1e-6 and r["eval_probs"] <= 1e-6, r
    assert r["x_grad"] <= 1e-6 * max(1.0, r["grad_scale"]), r
    assert r["w_grad"] <= 1e-6 * max(1.0, r["grad_scale"]), r
    assert r["grad_scale"] > 0.1, "no gradient reached the router"
    assert r["logged"] <= 1e-6, r
    expected = ["load_balancing_loss", "z_loss"] if variant == "z_loss" else ["load_balancing_loss"]
    assert r["logged_names"] == expected


def test_lean_routing_leaves_other_settings_to_megatron(probe):
    assert probe["routing"]["not_lean"] == {"sigmoid_bias": False, "seq_aux_loss": False,
                                            "fp64": False, "padding_mask": False}


@pytest.mark.parametrize("case", ["alltoall/grouped", "alltoall/sequential",
                                  "allgather/grouped", "allgather/sequential"])
def test_local_dispatcher_equals_megatrons(probe, case):
    d = probe["dispatch"][case]
    assert d["classes_local"] == ["LocalTokenDispatcher"]
    expected = {"alltoall": "MoEAlltoAllTokenDispatcher",
                "allgather": "MoEAllGatherTokenDispatcher"}[case.split("/")[0]]
    assert d["classes_megatron"] == [expected]
    assert d["loss"] == 0.0 and d["grad"] == 0.0, d
    assert 7.0 < d["loss_value"] < 10.0  # ~ln(4096) at init: a real forward ran


def test_platform_linear_equals_megatrons_in_the_model(probe):
    """Platform P10 (megasmoe/platform/cpu.py) on the whole model: bitwise."""
    r = probe["linear"]
    assert r["patched"] and r["params"] > 10
    assert r["loss"] == 0.0 and r["grad"] == 0.0, r


class _Group:
    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n


def _layer(ep=1, etp=1, **config):
    base = dict(moe_expert_capacity_factor=None, moe_router_padding_for_quantization=False,
                moe_shared_expert_overlap=False, moe_permute_fusion=False)
    base.update(config)
    d = SimpleNamespace(tp_ep_group=_Group(ep * etp), ep_group=_Group(ep), tp_group=_Group(etp))
    return SimpleNamespace(token_dispatcher=d, config=SimpleNamespace(**base))


@pytest.mark.parametrize("layer, applies", [
    (_layer(), True),
    (_layer(ep=2), False),
    (_layer(etp=2), False),
    (_layer(moe_expert_capacity_factor=1.0), False),
    (_layer(moe_router_padding_for_quantization=True), False),
    (_layer(moe_shared_expert_overlap=True), False),
])
def test_local_dispatcher_only_where_tokens_stay_on_their_rank(layer, applies):
    from megasmoe.moe.dispatch import local_dispatch_applies

    assert local_dispatch_applies(layer) is applies
