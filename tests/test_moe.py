"""``model.moe`` against a naive per-token float64 numpy reference of DeepSeek-V3's routing.

Reference (per token x):
    s = sigmoid(x W) (softmax for ``score_func="softmax"``);   c = s + b   (selection only)
    n_group > 1: rank groups by the sum of their top-2 c (``top2_sum``) or their max (``max``),
                 keep the ``topk_group`` best, set the rest of c to -inf
    ids = top-k of c;  w = s[ids] (/ sum, if ``norm_topk_prob``) * routed_scaling_factor
    y = sum_k w_k SwiGLU_{ids_k}(x) + SwiGLU_shared(x),  SwiGLU(x) = (silu(x Wg) * (x Wu)) Wd
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moela.configs.schema import LayerContext, MoEConfig
from moela.model.moe import MoE

D = 16
CTX = LayerContext(d_model=D, param_dtype="float32", compute_dtype="float32", init_std=0.3, norm_eps=1e-6)


# ----------------------------------------------------------------------------- numpy reference


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _silu(z):
    return z * _sigmoid(z)


def ref_route(x, w_router, bias, cfg: MoEConfig):
    """x [M, D] -> (weights [M, k], ids [M, k], scores [M, E]) one token at a time, float64."""
    x, w_router, bias = (np.asarray(a, np.float64) for a in (x, w_router, bias))
    e, k = cfg.num_experts, cfg.experts_per_token
    weights, ids, scores = [], [], []
    for xm in x:
        logits = xm @ w_router
        if cfg.score_func == "sigmoid":
            s = _sigmoid(logits)
        else:
            z = np.exp(logits - logits.max())
            s = z / z.sum()
        c = s + bias
        if cfg.n_group > 1:
            per = e // cfg.n_group
            group_scores = []
            for gi in range(cfg.n_group):
                members = sorted(c[gi * per : (gi + 1) * per], reverse=True)
                group_scores.append(members[0] + members[1] if cfg.group_score == "top2_sum" else members[0])
            keep = sorted(range(cfg.n_group), key=lambda gi: -group_scores[gi])[: cfg.topk_group]
            c = np.array([c[i] if i // per in keep else -np.inf for i in range(e)])
        chosen = sorted(range(e), key=lambda i: -c[i])[:k]
        w = np.array([s[i] for i in chosen])
        if cfg.norm_topk_prob:
            w = w / w.sum()
        weights.append(w * cfg.routed_scaling_factor)
        ids.append(chosen)
        scores.append(s)
    return np.array(weights), np.array(ids), np.array(scores)


def ref_swiglu(x, wg, wu, wd):
    return (_silu(x @ wg) * (x @ wu)) @ wd


def params64(moe: MoE):
    p = lambda v: np.asarray(v[...], np.float64)
    out = {
        "router": p(moe.router.w),
        "bias": p(moe.router.bias),
        "gate": p(moe.experts.w_gate),
        "up": p(moe.experts.w_up),
        "down": p(moe.experts.w_down),
    }
    if moe.shared is not None:
        out["shared"] = (p(moe.shared.w_gate), p(moe.shared.w_up), p(moe.shared.w_down))
    return out


def ref_moe(x_btd, moe: MoE, segment_ids=None):
    """-> (y [B, T, D], shared-only part [B, T, D], ids [M, k], scores [M, E])."""
    cfg, p = moe.cfg, params64(moe)
    b, t, d = x_btd.shape
    x = np.asarray(x_btd, np.float64).reshape(b * t, d)
    weights, ids, scores = ref_route(x, p["router"], p["bias"], cfg)
    valid = np.ones(b * t, bool) if segment_ids is None else np.asarray(segment_ids).reshape(-1) != 0
    y = np.zeros_like(x)
    for m in range(b * t):
        if not valid[m]:
            continue  # padding: routed experts weigh nothing
        for wk, ek in zip(weights[m], ids[m]):
            y[m] += wk * ref_swiglu(x[m], p["gate"][ek], p["up"][ek], p["down"][ek])
    shared = ref_swiglu(x, *p["shared"]) if "shared" in p else np.zeros_like(x)
    return (y + shared).reshape(b, t, d), shared.reshape(b, t, d), ids, scores


def ref_seq_aux_loss(ids, scores, valid_bt, cfg: MoEConfig):
    """DeepSeek-V3 eq. 17-20, per sequence over its non-padding tokens, averaged over the
    sequences that hold any token."""
    b, t = valid_bt.shape
    e, k = cfg.num_experts, cfg.experts_per_token
    ids = ids.reshape(b, t, k)
    scores = scores.reshape(b, t, e)
    losses = []
    for bi in range(b):
        toks = [ti for ti in range(t) if valid_bt[bi, ti]]
        n = len(toks)
        if n == 0:
            continue
        f = np.zeros(e)
        p = np.zeros(e)
        for ti in toks:
            for ek in ids[bi, ti]:
                f[ek] += e / (k * n)
            p += scores[bi, ti] / scores[bi, ti].sum() / n
        losses.append(np.sum(f * p))
    return cfg.seq_aux_loss_coef * np.mean(losses)


# ----------------------------------------------------------------------------- helpers


def make_moe(cfg: MoEConfig, seed=0, bias_std=0.1, std=0.3):
    """The module with random N(0, std) parameters and an N(0, bias_std) selection bias.

    Built abstractly and filled from numpy: initialising eagerly compiles the truncated-normal
    sampler for every new shape, seconds each on CPU (``test_constructor`` covers the real init).
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(cfg, CTX, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, std, a.shape), a.dtype), state)
    moe = nnx.merge(graphdef, state)
    moe.router.bias[...] = jnp.asarray(rng.normal(0.0, bias_std, cfg.num_experts), jnp.float32)
    return moe


def make_x(b, t, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, D)), jnp.float32)


@jax.jit(static_argnums=0)
def _forward(graphdef, state, x_btd, segment_ids_bt):
    """One compiled program per config: the MoE output and stats, and the router's own outputs."""
    moe = nnx.merge(graphdef, state)
    y, stats = moe(x_btd, segment_ids_bt)
    return y, stats, moe.router(x_btd.reshape(-1, x_btd.shape[-1]))


def forward(moe, x, segment_ids=None):
    return _forward(*nnx.split(moe), x, segment_ids)


ALPHA = 0.03
CONFIGS = {
    "sigmoid-g1-k3-norm-shared2": MoEConfig(
        num_experts=12,
        experts_per_token=3,
        num_shared_experts=2,
        d_ff=8,
        routed_scaling_factor=2.5,
        seq_aux_loss_coef=ALPHA,
    ),
    "sigmoid-g4-top2sum-k3-norm": MoEConfig(
        num_experts=12,
        experts_per_token=3,
        num_shared_experts=0,
        d_ff=8,
        n_group=4,
        topk_group=2,
        group_score="top2_sum",
        routed_scaling_factor=1.7,
        seq_aux_loss_coef=ALPHA,
    ),
    "sigmoid-g4-max-k1-nonorm-shared2": MoEConfig(
        num_experts=12,
        experts_per_token=1,
        num_shared_experts=2,
        d_ff=8,
        n_group=4,
        topk_group=2,
        group_score="max",
        norm_topk_prob=False,
        seq_aux_loss_coef=ALPHA,
    ),
    "softmax-g1-k3-nonorm": MoEConfig(
        num_experts=12,
        experts_per_token=3,
        num_shared_experts=0,
        d_ff=8,
        score_func="softmax",
        norm_topk_prob=False,
        seq_aux_loss_coef=ALPHA,
    ),
    "softmax-g3-max-k3-norm-shared2": MoEConfig(
        num_experts=12,
        experts_per_token=3,
        num_shared_experts=2,
        d_ff=8,
        score_func="softmax",
        n_group=3,
        topk_group=1,
        group_score="max",
        routed_scaling_factor=16.0,
        seq_aux_loss_coef=ALPHA,
    ),
    "sigmoid-g1-k1-nonorm-noaux": MoEConfig(
        num_experts=12, experts_per_token=1, num_shared_experts=0, d_ff=8, norm_topk_prob=False
    ),
    "sigmoid-g2-top2sum-k3-nonorm-shared2": MoEConfig(
        num_experts=12,
        experts_per_token=3,
        num_shared_experts=2,
        d_ff=8,
        n_group=2,
        topk_group=1,
        norm_topk_prob=False,
        seq_aux_loss_coef=ALPHA,
    ),
}
CFG_PARAMS = [pytest.param(c, id=name) for name, c in CONFIGS.items()]
B, T = 3, 16
# Packed rows with padding (segment 0): two documents + padding, one document + padding, a full row.
SEGMENTS = np.array([[1] * 6 + [2] * 5 + [0] * 5, [1] * 3 + [0] * 13, [1] * 9 + [2] * 7], np.int32)


def _check_forward(moe, x, segment_ids=None):
    cfg = moe.cfg
    y, stats, (weights, ids, scores) = forward(moe, x, None if segment_ids is None else jnp.asarray(segment_ids))
    assert y.shape == x.shape and y.dtype == jnp.float32
    ref_y, ref_shared, ref_ids, ref_scores = ref_moe(x, moe, segment_ids)
    p = params64(moe)
    ref_w, _, _ = ref_route(np.asarray(x).reshape(-1, D), p["router"], p["bias"], cfg)
    # Router: scores, the chosen experts (in descending-choice order) and their weights.
    assert weights.shape == ids.shape == (B * T, cfg.experts_per_token) and ids.dtype == jnp.int32
    np.testing.assert_allclose(np.asarray(scores, np.float64), ref_scores, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    np.testing.assert_allclose(np.asarray(weights, np.float64), ref_w, rtol=1e-5, atol=1e-7)
    # Output.
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5 * np.abs(ref_y).max())
    # Load: tokens per expert over the non-padding rows.
    valid = np.ones(B * T, bool) if segment_ids is None else segment_ids.reshape(-1) != 0
    counts = np.bincount(ref_ids[valid].reshape(-1), minlength=cfg.num_experts)
    np.testing.assert_array_equal(np.asarray(stats["load"]), counts)
    assert float(np.asarray(stats["load"]).sum()) == valid.sum() * cfg.experts_per_token
    # Sequence-wise aux loss.
    if cfg.seq_aux_loss_coef:
        expected = ref_seq_aux_loss(ref_ids, ref_scores, valid.reshape(B, T), cfg)
        assert expected > 0
        np.testing.assert_allclose(float(stats["aux_loss"]), expected, rtol=1e-5)
    else:
        assert float(stats["aux_loss"]) == 0.0
    return y, ref_shared


# ----------------------------------------------------------------------------- routing and forward


@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_moe_matches_reference(cfg):
    moe = make_moe(cfg)
    _check_forward(moe, make_x(B, T))


@pytest.mark.parametrize("cfg", [CFG_PARAMS[0], CFG_PARAMS[1], CFG_PARAMS[4], CFG_PARAMS[5]])
def test_moe_padding_rows(cfg):
    """Segment id 0 rows: excluded from the load and the aux loss, and their routed output is
    zero (the output is the shared experts' only); other rows are unaffected by the marking."""
    moe = make_moe(cfg)
    x = make_x(B, T, seed=7)
    y, ref_shared = _check_forward(moe, x, SEGMENTS)
    pad = SEGMENTS == 0
    np.testing.assert_allclose(y[pad], ref_shared[pad], rtol=1e-5, atol=1e-6)
    if moe.shared is None:
        assert np.all(y[pad] == 0.0)
    y_unmarked, _, _ = forward(moe, x)
    np.testing.assert_allclose(y[~pad], np.asarray(y_unmarked)[~pad], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_routing_cases_are_discriminating(cfg):
    """The test inputs exercise every rule: the bias, the group limit and the group score change
    some choices, so a router that ignored one of them would fail ``test_moe_matches_reference``."""
    moe = make_moe(cfg)
    x_md = np.asarray(make_x(B, T)).reshape(-1, D)
    p = params64(moe)
    _, ids, _ = ref_route(x_md, p["router"], p["bias"], cfg)
    _, ids_nobias, _ = ref_route(x_md, p["router"], np.zeros_like(p["bias"]), cfg)
    assert np.any(np.sort(ids, -1) != np.sort(ids_nobias, -1)), "bias never changes the selection"
    if cfg.n_group > 1:
        _, ids_flat, _ = ref_route(x_md, p["router"], p["bias"], dataclasses.replace(cfg, n_group=1))
        # (Ranking groups by their max with k <= topk_group provably never excludes a top-k expert.)
        if cfg.group_score == "top2_sum" or cfg.experts_per_token > cfg.topk_group:
            assert np.any(np.sort(ids, -1) != np.sort(ids_flat, -1)), "group limit never changes the selection"
        other = "max" if cfg.group_score == "top2_sum" else "top2_sum"
        _, ids_other, _ = ref_route(x_md, p["router"], p["bias"], dataclasses.replace(cfg, group_score=other))
        assert np.any(np.sort(ids, -1) != np.sort(ids_other, -1)), "group score rule never matters"


def test_router_weights_use_unbiased_scores():
    cfg = MoEConfig(num_experts=12, experts_per_token=3, d_ff=8, norm_topk_prob=False, num_shared_experts=0)
    moe = make_moe(cfg, bias_std=0.0)
    x_md = make_x(1, 16)[0]
    router = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    graphdef, state = nnx.split(moe.router)
    _, _, s0 = router(state, x_md)
    # A large bias on expert 5 forces it into every selection, but its weight stays the raw score.
    moe.router.bias[...] = jnp.zeros((12,), jnp.float32).at[5].set(10.0)
    graphdef, state = nnx.split(moe.router)
    w1, ids1, s1 = (np.asarray(a) for a in router(state, x_md))
    np.testing.assert_array_equal(np.asarray(s0), s1)
    assert np.all(ids1[:, 0] == 5)
    np.testing.assert_allclose(w1[:, 0], s1[:, 5], rtol=1e-6)
    assert np.all(w1 < 1.0)


def test_constructor():
    """The real initialiser: parameter shapes, kinds and dtypes, a zero bias; output matches the reference."""
    cfg = CONFIGS["sigmoid-g1-k3-norm-shared2"]
    moe = MoE(cfg, CTX, rngs=nnx.Rngs(0))
    e, f = cfg.num_experts, cfg.d_ff
    assert isinstance(moe.router.w, nnx.Param) and moe.router.w[...].shape == (D, e)
    assert not isinstance(moe.router.bias, nnx.Param) and np.all(np.asarray(moe.router.bias[...]) == 0)
    assert moe.experts.w_gate[...].shape == moe.experts.w_up[...].shape == (e, D, f)
    assert moe.experts.w_down[...].shape == (e, f, D)
    assert moe.shared.w_gate[...].shape == (D, 2 * f) and moe.shared.w_down[...].shape == (2 * f, D)
    for _, v in nnx.to_flat_state(nnx.state(moe, nnx.Param)):
        assert v[...].dtype == jnp.float32 and 0.2 < float(jnp.std(v[...])) < 0.35  # truncated N(0, 0.3)
    _check_forward(moe, make_x(B, T))


# ----------------------------------------------------------------------------- aux loss


def test_sequence_aux_loss_uniform_scores_is_alpha():
    """Uniform scores make P_i = 1/E, so sum_i f_i P_i = sum_i count_i / (k T) = 1 and the loss is
    alpha, whichever experts the tie-breaking picks."""
    cfg = dataclasses.replace(CONFIGS["softmax-g1-k3-nonorm"], seq_aux_loss_coef=0.5)
    moe = make_moe(cfg, bias_std=0.0)
    moe.router.w[...] = jnp.zeros_like(moe.router.w[...])  # every score 1/E
    _, stats, _ = forward(moe, make_x(B, T), jnp.asarray(SEGMENTS))
    np.testing.assert_allclose(float(stats["aux_loss"]), 0.5, rtol=1e-6)


def test_sequence_aux_loss_is_per_sequence():
    """Concentrating one sequence's routing raises the loss; swapping the sequences does not change it."""
    cfg = CONFIGS["sigmoid-g1-k3-norm-shared2"]
    moe = make_moe(cfg)
    x = make_x(B, T, seed=4)
    _, stats, _ = forward(moe, x, jnp.asarray(SEGMENTS))
    _, stats_swapped, _ = forward(moe, x[::-1], jnp.asarray(SEGMENTS[::-1]))
    np.testing.assert_allclose(float(stats_swapped["aux_loss"]), float(stats["aux_loss"]), rtol=1e-6)
    # a row of pure padding neither adds to nor dilutes the average
    padded = np.asarray(SEGMENTS).copy()
    padded[0] = 0
    _, stats_pad, _ = forward(moe, x, jnp.asarray(padded))
    _, stats_rest, _ = forward(moe, x[1:], jnp.asarray(SEGMENTS[1:]))
    np.testing.assert_allclose(float(stats_pad["aux_loss"]), float(stats_rest["aux_loss"]), rtol=1e-6)
    x_same = x.at[2].set(jnp.broadcast_to(x[2, :1], x[2].shape))  # every token of sequence 2 alike
    _, stats_same, _ = forward(moe, x_same, jnp.asarray(SEGMENTS))
    assert float(stats_same["aux_loss"]) > float(stats["aux_loss"])


# ----------------------------------------------------------------------------- gradients


def _loss_fn(cotangent):
    def loss(moe, x):
        y, stats = moe(x)
        return jnp.sum(y * cotangent) + stats["aux_loss"]

    return loss


@pytest.mark.parametrize("cfg", [CFG_PARAMS[0], CFG_PARAMS[1], CFG_PARAMS[3]])
def test_gradients_flow(cfg):
    moe = make_moe(cfg)
    x = make_x(B, T, seed=5)
    cot = jnp.asarray(np.random.default_rng(6).standard_normal(x.shape), jnp.float32)
    grads = nnx.jit(nnx.grad(_loss_fn(cot)))(moe, x)
    flat = dict(nnx.to_flat_state(grads))
    names = {".".join(map(str, k)) for k in flat}
    # Only parameters are differentiated: the selection bias is not an nnx.Param.
    assert "router.bias" not in names
    expected = {"router.w", "experts.w_gate", "experts.w_up", "experts.w_down"}
    if cfg.num_shared_experts:
        expected |= {"shared.w_gate", "shared.w_up", "shared.w_down"}
    assert expected == names
    for name, g in flat.items():
        g = np.asarray(g[...])
        assert np.all(np.isfinite(g)), name
        assert np.abs(g).max() > 1e-6, f"zero gradient for {name}"
    # Experts nobody picked get exactly zero gradient; picked ones a non-zero one.
    _, _, ref_ids, _ = ref_moe(x, moe)
    picked = np.zeros(cfg.num_experts, bool)
    picked[np.unique(ref_ids)] = True
    g_down = np.abs(np.asarray(flat[("experts", "w_down")][...])).reshape(cfg.num_experts, -1).max(-1)
    assert np.all(g_down[~picked] == 0.0)
    assert np.all(g_down[picked] > 0.0)


def test_gradients_match_dense_jnp():
    """jax.grad through the ragged (sorted, grouped-matmul) experts equals jax.grad of a dense
    every-expert-for-every-token formulation with the same routing."""
    cfg = dataclasses.replace(CONFIGS["sigmoid-g4-top2sum-k3-norm"], num_shared_experts=1, seq_aux_loss_coef=0.0)
    moe = make_moe(cfg)
    x = make_x(B, T, seed=8)
    cot = jnp.asarray(np.random.default_rng(9).standard_normal(x.shape), jnp.float32)
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def both(params):
        def moe_loss(params):
            y, _ = nnx.merge(graphdef, params, rest)(x)
            return jnp.sum(y * cot)

        def dense_loss(params):
            m = nnx.merge(graphdef, params, rest)
            x_md = x.reshape(-1, D)
            _, ids, _ = m.router(x_md)
            s = jax.nn.sigmoid(x_md @ m.router.w[...])
            w = jnp.take_along_axis(s, ids, axis=-1)
            w = w / jnp.sum(w, -1, keepdims=True) * cfg.routed_scaling_factor
            combine_me = jnp.sum(jax.nn.one_hot(ids, cfg.num_experts) * w[..., None], axis=1)
            h = jax.nn.silu(jnp.einsum("md,edf->mef", x_md, m.experts.w_gate[...]))
            h = h * jnp.einsum("md,edf->mef", x_md, m.experts.w_up[...])
            y_med = jnp.einsum("mef,efd->med", h, m.experts.w_down[...])
            y = jnp.einsum("med,me->md", y_med, combine_me) + m.shared(x).reshape(-1, D)
            return jnp.sum(y.reshape(x.shape) * cot)

        return jax.grad(moe_loss)(params), jax.grad(dense_loss)(params)

    g_moe, g_dense = jax.jit(both)(params)
    flat_moe, flat_dense = dict(nnx.to_flat_state(g_moe)), dict(nnx.to_flat_state(g_dense))
    assert flat_moe.keys() == flat_dense.keys()
    for key in flat_moe:
        a, b = np.asarray(flat_moe[key][...]), np.asarray(flat_dense[key][...])
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=str(key))
