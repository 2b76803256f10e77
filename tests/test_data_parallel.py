"""The train step's data-parallel region (parallel/data_parallel.py, train/step.py): routed experts stay on their
devices, gradients are summed locally over the micro-batches and reduced once per step.

The 8-device checks run in one subprocess (STEP_SCRIPT) that prints one JSON line, "ok" or the failure per check:
the compiled program's gradient collectives at two micro-batch counts, expert-weight gathers, and two real
optimizer steps (AdamW, micro-batches, MTP) on experts-resident layouts against the same steps on one device.
"""

import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsv3_jax.errors import ConfigError
from dsv3_jax.kernels.shapes import group_of_rows
from dsv3_jax.parallel import data_parallel
from dsv3_jax.presets import load_config
from tests import xla_env

MANUAL = ("data", "fsdp", "expert")  # the default rules' batch axes: the region's manual axes


def test_group_of_rows_equals_searchsorted_over_the_group_ends():
    rng = np.random.default_rng(0)
    for sizes in ([3, 0, 2, 0], [0, 0, 0], [5], list(rng.integers(0, 4, size=9))):
        sizes = np.asarray(sizes, np.int32)
        rows = int(sizes.sum()) + 3  # rows past the last group belong to "group E"
        want = np.searchsorted(np.cumsum(sizes), np.arange(rows), side="right")
        np.testing.assert_array_equal(np.asarray(group_of_rows(jnp.asarray(sizes), rows)), want)


def test_entry_spec_keeps_only_the_expert_shards_of_routed_expert_weights():
    expert_w = ("experts", "embed", "expert_mlp")
    # a routed-expert weight keeps its `experts` dimension's batch axes and is gathered along the others
    assert data_parallel.entry_spec(P(("fsdp", "expert"), "data", "tensor"), expert_w, MANUAL) == \
        P(("fsdp", "expert"), None, None)
    assert data_parallel.entry_spec(P("expert", "fsdp", None), expert_w, MANUAL) == P("expert", None, None)
    # every other weight enters whole (gathered once per step); the tensor axis is not the region's
    assert data_parallel.entry_spec(P("fsdp", "tensor"), ("embed", "mlp"), MANUAL) == P(None, None)
    # impl.gather_weights=layer: they keep their shards over `expert` (inside a node), gathered as they are used
    assert data_parallel.entry_spec(P(("expert", "fsdp"), "tensor"), ("embed", "mlp"), MANUAL, per_layer=True) == \
        P("expert", None)
    assert data_parallel.entry_spec(P("fsdp", "tensor"), ("embed", "mlp"), MANUAL, per_layer=True) == P(None, None)
    # the gradient leaves on the parameter's own shards over the region's axes
    assert data_parallel.exit_spec(P(("fsdp", "expert"), "data", "tensor"), MANUAL) == P(("fsdp", "expert"), "data",
                                                                                         None)


def test_grad_reduce_names_its_choices_in_a_one_line_error():
    assert load_config("tiny", ["impl.grad_reduce=micro_batch"]).impl.grad_reduce == "micro_batch"
    with pytest.raises(ConfigError, match="impl.grad_reduce must be step or micro_batch, got 'once'"):
        load_config("tiny", ["impl.grad_reduce=once"])


STEP_SCRIPT = textwrap.dedent(r"""
    import functools, json, os
    # XLA:CPU's fusion emitters (MLIR, one pipeline per fusion) take ~2/3 of each step's compile here; the legacy
    # emitter compiles the same partitioned program (the collectives these checks read are unchanged) ~3x faster,
    # and every step, the one-device reference included, runs on it
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false"
    from tests.checks import outcome, packed_rows
    import jax, numpy as np
    from jax.sharding import NamedSharding
    from dsv3_jax.presets import load_config
    from dsv3_jax.parallel.sharding import logical_spec, make_mesh, rules_for, use_rules
    from dsv3_jax.tools import hlo
    from dsv3_jax.train.state import init_state
    from dsv3_jax.train.step import jit_train_step

    SEQ, B = 16, 64
    # moe_intermediate_size 28 is no other weight's width: an all-gather with a (48, 28) or (28, 48) pair of dims is
    # a routed-expert weight
    BASE = [f"data.seq_len={SEQ}", f"train.global_batch_size={B}", "train.bias_gamma=0.01", "train.warmup_steps=1",
            "train.balance_alpha=0.01", "model.moe_intermediate_size=28", "model.n_shared_experts=2"]
    D, F = 48, 28
    RESIDENT = ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=4", "mesh.rules={experts: [fsdp, expert]}"]
    SPLIT = ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2",
             "mesh.rules={experts: [fsdp, expert, tensor]}"]
    DEFAULT = ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=4"]
    # the other weights sharded over expert x fsdp, kept on their `expert` shards (the intra-node axis) in the
    # region and gathered layer by layer
    LAYER = ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=4", "impl.gather_weights=layer",
             "mesh.rules={experts: [fsdp, expert], embed: [expert, fsdp], q_lora: [expert, fsdp], "
             "kv_lora: [expert, fsdp]}"]
    # and the vocabulary never whole: the head's cross-entropy over 100-column chunks (258 = 2 x 100 + 58), each
    # chunk's columns gathered as used; the embedding looked up in its D shards
    V, VOCAB_CHUNK = 258, ["impl.vocab_chunk=100"]

    rng = np.random.default_rng(0)

    batches = [packed_rows(rng, B, SEQ), packed_rows(rng, B, SEQ)]

    @functools.cache  # each (config, count) compiled once: the steps' layouts are also the programs read below
    def build(overrides, m, one_device=False):
        overrides, devices = list(overrides), jax.devices()[:1] if one_device else None
        cfg = load_config("tiny", [*BASE, f"train.micro_batches={m}", *overrides])
        mesh = make_mesh(cfg.mesh, devices=devices)
        with use_rules(rules_for(cfg.mesh)):
            state, graphdef, tx = init_state(cfg, mesh)
            rows = NamedSharding(mesh, logical_spec(("batch",)))
        step = jit_train_step(cfg, graphdef, tx, mesh, state, donate=False)
        placed = [{k: jax.device_put(v, rows) for k, v in b.items()} for b in batches]
        with jax.set_mesh(mesh), use_rules(rules_for(cfg.mesh)):
            return step.lower(state, placed[0]).compile(), state, placed

    def two_steps(overrides, one_device=False):
        step, state, placed = build(tuple(overrides), 2, one_device)
        out = []
        for b in placed:
            state, metrics = step(state, b)
            out.append(jax.device_get(metrics))
        return out, jax.device_get(state.bias)

    @functools.cache
    def collective_ops(text):
        return hlo.analyze(text, 8)["collective_ops"]

    def grad_collectives(text):  # (kind, shape, times) of every all-reduce / reduce-scatter over 1 KiB, and bytes
        ops = [o for o in collective_ops(text)
               if o["kind"] in ("all-reduce", "reduce-scatter") and o["bytes"] / o["times"] >= 1024]
        return sorted((o["kind"], o["shape"], o["times"]) for o in ops), sum(o["bytes"] for o in ops)

    def expert_gathers(text):
        def has_expert_dims(dims):
            return any(list(dims[i:i + 2]) in ([D, F], [F, D]) for i in range(len(dims) - 1))

        return [o["shape"] for o in collective_ops(text) if o["kind"] == "all-gather"
                and any(has_expert_dims(d) for _, d in hlo.arrays(o["shape"]))]

    def check_equal(ref, got):
        (ref_metrics, ref_bias), (metrics, bias) = ref, got
        for i, (r, g) in enumerate(zip(ref_metrics, metrics)):
            for k in ("loss", "total_loss", "mtp_loss", "balance_loss", "grad_norm"):
                np.testing.assert_allclose(g[k], r[k], rtol=1e-6, atol=1e-6, err_msg=f"step {i + 1} {k}")
            # loads are counts / mean count: one count off moves them by >= 1e-3
            np.testing.assert_allclose(g["expert_load"], r["expert_load"], rtol=1e-6, err_msg=f"step {i + 1} load")
        for r, g in zip(jax.tree.leaves(ref_bias), jax.tree.leaves(bias)):
            np.testing.assert_allclose(g, r, rtol=0, atol=1e-6, err_msg="router bias after two steps")

    def check_collectives(texts):
        (g2, b2), (g8, b8) = grad_collectives(texts["step", 2]), grad_collectives(texts["step", 8])
        assert g2 and all(times == 1 for _, _, times in g2), g2  # none inside the micro-batch loop
        assert (g2, b2) == (g8, b8), (b2, b8, g2, g8)
        # the same measurement sees the per-micro-batch reduction of impl.grad_reduce=micro_batch
        (p2, q2), (p8, q8) = grad_collectives(texts["micro_batch", 2]), grad_collectives(texts["micro_batch", 8])
        assert q8 > 2 * q2, (q2, q8)

    def check_gathers(texts):
        assert not expert_gathers(texts["step", 2]), expert_gathers(texts["step", 2])
        assert not expert_gathers(texts["step", 8]), expert_gathers(texts["step", 8])
        # the default layout under micro_batch gathers each expert weight's `embed` shards over fsdp: seen
        assert expert_gathers(texts["micro_batch", 2]), "the measurement finds no expert gather anywhere"

    def check_layer(texts):
        ids, names = np.arange(8).reshape(1, 2, 4, 1), ("data", "fsdp", "expert", "tensor")
        big = {m: [o for o in hlo.analyze(texts["layer", m], 8, None, ids, names)["collective_ops"]
                   if o["kind"] in ("all-gather", "reduce-scatter", "all-reduce") and o["bytes"] / o["times"] >= 1024]
               for m in (2, 8)}
        # in the micro-batch loop (times >= m): weight gathers and gradient reduce-scatters over `expert` only
        looped = [o for o in big[8] if o["times"] >= 8]
        assert looped and all(o["axes"] == ("expert",) for o in looped), [(o["axes"], o["shape"]) for o in looped]
        assert {o["kind"] for o in looped} >= {"all-gather", "reduce-scatter"}, looped
        # across `fsdp` (the other nodes): once per step, the same at 2 and 8 micro-batches
        across = {m: sorted((o["kind"], o["shape"], o["times"]) for o in big[m] if "fsdp" in o["axes"]) for m in (2, 8)}
        assert across[2] and across[2] == across[8] and all(t == 1 for _, _, t in across[8]), across

    def vocab_gathers(text):  # all-gathers whose result holds the embedding or the head whole: (V, D) or (D, V)
        return [o["shape"] for o in collective_ops(text) if o["kind"] == "all-gather"
                and any(sorted(d[-2:]) == [D, V] for _, d in hlo.arrays(o["shape"]))]

    def check_vocab(texts):
        assert vocab_gathers(texts["layer", 2]), "the measurement finds no gather of the embedding or the head"
        assert not vocab_gathers(texts["layer-chunked", 2]), vocab_gathers(texts["layer-chunked", 2])

    def check_capacity(dropless):
        assert all(float(m["moe_dropped_fraction"]) == 0 for m in dropless[0]), "drops without a capacity factor"
        frac = [float(m["moe_dropped_fraction"]) for m in two_steps([*RESIDENT, "impl.moe_capacity_factor=0.5"])[0]]
        # half the balanced share per peer: at least half the rows cannot fit; the layer still trains
        assert all(0.5 <= f < 1 for f in frac), frac

    results = {}
    ref = two_steps(["mesh.data=1"], one_device=True)
    resident = two_steps(RESIDENT)
    results["resident"] = outcome(check_equal, ref, resident)
    results["capacity"] = outcome(check_capacity, resident)
    results["token-split"] = outcome(check_equal, ref, two_steps(SPLIT))
    results["layer"] = outcome(check_equal, ref, two_steps(LAYER))
    results["layer-chunked"] = outcome(check_equal, ref, two_steps([*LAYER, *VOCAB_CHUNK]))
    texts = {("step", m): build(tuple(RESIDENT), m)[0].as_text() for m in (2, 8)}
    texts.update({("micro_batch", m): build((*DEFAULT, "impl.grad_reduce=micro_batch"), m)[0].as_text()
                  for m in (2, 8)})
    texts.update({("layer", m): build(tuple(LAYER), m)[0].as_text() for m in (2, 8)})
    texts["layer-chunked", 2] = build((*LAYER, *VOCAB_CHUNK), 2)[0].as_text()
    results["collectives"] = outcome(check_collectives, texts)
    results["layer-collectives"] = outcome(check_layer, texts)
    results["gathers"] = outcome(check_gathers, texts)
    results["vocab-gathers"] = outcome(check_vocab, texts)
    print("DP_RESULTS", json.dumps(results))
""")


@pytest.fixture(scope="module")
def region_steps() -> dict[str, str]:
    return xla_env.script_results(STEP_SCRIPT, "DP_RESULTS", timeout=1500)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["resident", "token-split", "layer", "layer-chunked"])
def test_two_optimizer_steps_equal_the_single_device_steps(region_steps, layout):
    """Two AdamW steps (micro_batches 2, MTP, packed documents, a padded row) vs one device, within 1e-6: losses,
    grad norm, expert loads, router bias. resident: fsdp=2 x expert=4 with the experts over both axes (one expert per
    device, the data-parallel region); token-split: fsdp=2 x expert=2 x tensor=2 with the experts over all three, the
    tokens each tensor pair shares split between them before the exchange; layer: resident, the other weights on
    their `expert` shards, gathered layer by layer (impl.gather_weights=layer); layer-chunked: layer with
    impl.vocab_chunk=100 (the head's cross-entropy over vocabulary chunks, the embedding looked up in its D shards)."""
    assert region_steps[layout] == "ok", region_steps[layout]


@pytest.mark.slow
def test_gradient_collectives_do_not_depend_on_the_micro_batch_count(region_steps):
    """The resident layout's all-reduces and reduce-scatters over 1 KiB: outside every loop, the same ops and bytes
    at micro_batches 2 and 8; under impl.grad_reduce=micro_batch the bytes grow with the count."""
    assert region_steps["collectives"] == "ok", region_steps["collectives"]


@pytest.mark.slow
def test_capacity_factor_drops_rows_and_the_step_reports_the_fraction(region_steps):
    """impl.moe_capacity_factor=0.5 on the resident layout: moe_dropped_fraction in [0.5, 1) on both steps; 0
    without a factor."""
    assert region_steps["capacity"] == "ok", region_steps["capacity"]


@pytest.mark.slow
def test_no_all_gather_of_routed_expert_weights(region_steps):
    """No all-gather whose result holds an expert weight's (embed, expert_mlp) plane, at micro_batches 2 and 8."""
    assert region_steps["gathers"] == "ok", region_steps["gathers"]


@pytest.mark.slow
def test_layer_gathers_stay_on_the_intra_node_axis(region_steps):
    """impl.gather_weights=layer with the other weights sharded over expert x fsdp: every weight gather and
    gradient reduce-scatter inside the micro-batch loop runs over `expert`; what crosses `fsdp` runs once per step,
    the same ops at micro_batches 2 and 8."""
    assert region_steps["layer-collectives"] == "ok", region_steps["layer-collectives"]


@pytest.mark.slow
def test_vocabulary_weights_are_never_gathered_whole_under_vocab_chunk(region_steps):
    """The layer layout gathers the head whole in the micro-batch loop (an all-gather with a (48, 258) result);
    with impl.vocab_chunk=100 no all-gather returns the head or the embedding whole: the head's columns come 100 at a
    time, the table stays on its `expert` shards (only its fsdp shards are gathered, once, entering the region)."""
    assert region_steps["vocab-gathers"] == "ok", region_steps["vocab-gathers"]
