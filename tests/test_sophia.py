"""Sophia-G: the update against Algorithm 3 by hand, the GNB estimator's expectation against the
exact Gauss-Newton diagonal, convergence on an ill-conditioned softmax regression, the config."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maxlm import optim
from maxlm.config import SophiaConfig, load
from maxlm.sophia import ScaleBySophiaState, gnb_hessian, sample_targets, scale_by_sophia, sophia

B1, B2, RHO, EPS, WD = 0.9, 0.8, 0.5, 1e-3, 0.1


def lr_at(count: Any) -> Any:
    return 0.1 * (count + 1)  # a schedule whose value differs at every step


def numpy_sophia(params: dict, grads: list, hessians: list) -> list[dict]:
    """Algorithm 3 written out: m, h (updated only where an estimate is given), decay, clip."""
    decayed = {"w": 1.0, "scale": 0.0}  # the mask
    m = {k: np.zeros_like(v) for k, v in params.items()}
    h = {k: np.zeros_like(v) for k, v in params.items()}
    p = {k: np.array(v, np.float64) for k, v in params.items()}
    history = []
    for t, (g, h_hat) in enumerate(zip(grads, hessians, strict=True)):
        step = {}
        for k in p:
            m[k] = B1 * m[k] + (1 - B1) * g[k]
            if h_hat is not None:
                h[k] = B2 * h[k] + (1 - B2) * h_hat[k]
            ratio = np.clip(m[k] / np.maximum(RHO * h[k], EPS), -1, 1)
            step[k] = -lr_at(t) * (ratio + WD * decayed[k] * p[k])
            p[k] = p[k] + step[k]
        history.append(step)
    return history


def test_update_matches_algorithm_3_by_hand() -> None:
    params = {"w": np.array([1.0, -2.0, 0.5]), "scale": np.array([1.0, 2.0])}
    grads = [
        {"w": np.array([1.0, -2.0, 0.02]), "scale": np.array([0.5, 0.0])},
        {"w": np.array([-0.5, 0.3, 0.1]), "scale": np.array([0.2, -1.0])},
    ]
    # Step 0 estimates h (one coordinate 0: the eps floor); step 1 has none, so h is kept.
    hessians = [{"w": np.array([4.0, 1.0, 0.0]), "scale": np.array([0.1, 3.0])}, None]
    tx = sophia(
        lr_at, b1=B1, b2=B2, rho=RHO, eps=EPS, weight_decay=WD, mask={"w": True, "scale": False}
    )

    p = jax.tree.map(jnp.float32, params)
    state = tx.init(p)
    got = []
    for g, h_hat in zip(grads, hessians, strict=True):
        extra = {} if h_hat is None else {"hessian": jax.tree.map(jnp.float32, h_hat)}
        updates, state = tx.update(jax.tree.map(jnp.float32, g), state, p, **extra)
        p = optax.apply_updates(p, updates)
        got.append(updates)

    expected = numpy_sophia(params, grads, hessians)
    for g_step, e_step in zip(got, expected, strict=True):
        for k in params:
            np.testing.assert_allclose(g_step[k], e_step[k], rtol=1e-5, atol=1e-7)
    # The case mix the test is about: step 0 clips w[1], w[2] (eps floor), scale[0], not w[0].
    ratio0 = -np.asarray(got[0]["w"]) / lr_at(0) - WD * params["w"]
    np.testing.assert_allclose(ratio0, [0.25, -1.0, 1.0], rtol=1e-5)
    np.testing.assert_allclose(got[0]["scale"], [-0.1, 0.0], atol=1e-7)
    # h after step 1 is still step 0's 0.2 * h_hat.
    inner = state[0]
    assert isinstance(inner, ScaleBySophiaState) and int(inner.count) == 2
    np.testing.assert_allclose(inner.hessian["w"], [0.8, 0.2, 0.0], rtol=1e-6)


def test_hessian_is_folded_in_only_when_due() -> None:
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([0.1, -0.1, 0.2])}
    h_hat = {"w": jnp.full(3, 5.0)}
    tx = scale_by_sophia(b2=0.5, update_hessian_every=3)

    def h_after(*calls: dict) -> np.ndarray:
        state = tx.init(params)
        for extra in calls:
            _, state = tx.update(grads, state, params, **extra)
        return np.asarray(state.hessian["w"])

    np.testing.assert_allclose(h_after({"hessian": h_hat}), 2.5)  # count 0: due by default
    np.testing.assert_allclose(h_after({}, {"hessian": h_hat}), 0.0)  # count 1: not due
    np.testing.assert_allclose(h_after({}, {}, {}, {"hessian": h_hat}), 2.5)  # count 3: due
    # An explicit hessian_due overrides the count, and may be a traced bool.
    np.testing.assert_allclose(h_after({"hessian": h_hat, "hessian_due": False}), 0.0)
    np.testing.assert_allclose(h_after({}, {"hessian": h_hat, "hessian_due": jnp.array(True)}), 2.5)


def test_jitted_cond_pattern_equals_passing_the_estimate_on_due_steps() -> None:
    """A jitted step passes an estimate every step (zeros when not due) plus hessian_due."""
    k = 3
    tx = sophia(0.05, b1=0.9, b2=0.9, rho=0.1, weight_decay=0.01, update_hessian_every=k)
    params = {"w": jnp.array([1.0, -1.0, 2.0])}

    def grads(step: Any) -> dict:
        return {"w": jnp.sin(jnp.arange(3.0) + step)}

    def estimate(step: Any) -> dict:
        return {"w": 1.0 + jnp.cos(jnp.arange(3.0) * step) ** 2}

    @jax.jit
    def jitted(p: dict, s: optax.OptState, step: jax.Array) -> tuple[dict, optax.OptState]:
        due = step % k == 0
        h = jax.lax.cond(due, estimate, lambda _: jax.tree.map(jnp.zeros_like, p), step)
        updates, s = tx.update(grads(step), s, p, hessian=h, hessian_due=due)
        return optax.apply_updates(p, updates), s

    p_jit, s_jit = params, tx.init(params)
    p_py, s_py = params, tx.init(params)
    for step in range(8):
        p_jit, s_jit = jitted(p_jit, s_jit, jnp.int32(step))
        extra = {"hessian": estimate(step)} if step % k == 0 else {}
        updates, s_py = tx.update(grads(step), s_py, p_py, **extra)
        p_py = optax.apply_updates(p_py, updates)
    np.testing.assert_allclose(p_jit["w"], p_py["w"], rtol=1e-6)


# --------------------------------------------------------------------------- GNB estimator


def test_gnb_expectation_is_the_gauss_newton_diagonal() -> None:
    """Softmax regression, mean cross-entropy over the scored rows of x: the GN diagonal (here
    also the exact Hessian's) for W[d, c] is (1/n) sum_i x[i, d]^2 p[i, c] (1 - p[i, c])."""
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (6, 3))
    w = jax.random.normal(kw, (3, 4))
    scored = jnp.array([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])  # masked rows are not in the mean
    n = int(scored.sum())

    def loss_of_targets(w: jax.Array, targets: jax.Array) -> jax.Array:
        ce = optax.softmax_cross_entropy_with_integer_labels(x @ w, targets)
        return jnp.sum(ce * scored) / jnp.sum(scored)

    logits = x @ w
    rngs = jax.random.split(jax.random.key(1), 100_000)
    estimates = jax.jit(jax.vmap(lambda r: gnb_hessian(loss_of_targets, w, logits, r, n)))(rngs)
    mean = np.asarray(estimates.mean(0))

    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    xs = np.asarray(x, np.float64)[np.asarray(scored) > 0]
    exact = (xs[:, :, None] ** 2 * (p * (1 - p))[np.asarray(scored) > 0][:, None, :]).mean(0)
    # For a linear model the GN matrix is the Hessian, and CE's Hessian does not depend on y.
    any_targets = jnp.zeros(6, jnp.int32)
    full = jax.hessian(lambda v: loss_of_targets(v.reshape(3, 4), any_targets))(w.ravel())
    np.testing.assert_allclose(np.diag(np.asarray(full)).reshape(3, 4), exact, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(mean, exact, rtol=0.05)
    assert estimates.dtype == jnp.float32 and np.all(np.asarray(estimates) >= 0)


def test_sampled_targets_follow_the_softmax() -> None:
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.05, 0.05, 0.9]]))
    targets = jax.vmap(lambda r: sample_targets(logits, r))(
        jax.random.split(jax.random.key(2), 8000)
    )
    freq = np.stack([np.bincount(np.asarray(targets[:, i]), minlength=3) for i in range(2)]) / 8000
    np.testing.assert_allclose(freq, np.exp(np.asarray(logits)), atol=0.02)
    assert targets.shape == (8000, 2) and targets.dtype == jnp.int32  # one class id per row


# --------------------------------------------------------------------------- convergence


def test_converges_faster_than_tuned_sgd_on_ill_conditioned_softmax_regression() -> None:
    """Feature scales 8 .. 0.1 (curvatures spanning ~6000x), labels drawn from a teacher (so the
    optimum is finite); after 100 steps Sophia with GNB every 2 steps is near the optimum, SGD with
    momentum at its best learning rate is not."""
    kx, kw, ky = jax.random.split(jax.random.key(0), 3)
    n, d, c = 256, 6, 4
    x = jax.random.normal(kx, (n, d)) * jnp.array([8.0, 4.0, 1.0, 0.5, 0.25, 0.1])
    labels = jax.random.categorical(ky, x @ jax.random.normal(kw, (d, c)))

    def loss_of_targets(w: jax.Array, targets: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(x @ w, targets).mean()

    def loss(w: jax.Array) -> jax.Array:
        return loss_of_targets(w, labels)

    w0 = jnp.zeros((d, c))
    lbfgs = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    @jax.jit
    def lbfgs_step(w: jax.Array, s: optax.OptState) -> tuple[jax.Array, optax.OptState]:
        v, g = value_and_grad(w, state=s)
        u, s = lbfgs.update(g, s, w, value=v, grad=g, value_fn=loss)
        return optax.apply_updates(w, u), s

    w, s = w0, lbfgs.init(w0)
    for _ in range(300):
        w, s = lbfgs_step(w, s)
    optimum = float(loss(w))

    def gap_after_100(tx: optax.GradientTransformationExtraArgs, every: int | None) -> float:
        @jax.jit
        def step(w: jax.Array, s: optax.OptState, i: jax.Array) -> tuple[jax.Array, optax.OptState]:
            extra: dict[str, Any] = {}
            if every is not None:
                due = i % every == 0
                rng = jax.random.fold_in(jax.random.key(1), i)
                h = jax.lax.cond(
                    due,
                    lambda: gnb_hessian(loss_of_targets, w, x @ w, rng, n),
                    lambda: jnp.zeros_like(w),
                )
                extra = {"hessian": h, "hessian_due": due}
            u, s = tx.update(jax.grad(loss)(w), s, w, **extra)
            return optax.apply_updates(w, u), s

        w, s = w0, tx.init(w0)
        for i in range(100):
            w, s = step(w, s, jnp.int32(i))
        return float(loss(w)) - optimum

    sophia_gap = gap_after_100(sophia(0.1, b1=0.9, b2=0.9, rho=0.1, update_hessian_every=2), 2)
    sgd_gap = min(
        gap_after_100(optax.chain(optax.sgd(lr, momentum=0.9)), None) for lr in (0.03, 0.1, 0.3)
    )
    assert float(loss(w0)) - optimum > 1.0
    assert sophia_gap < 1e-3
    assert sgd_gap > 5 * sophia_gap


# --------------------------------------------------------------------------- config / build


def test_build_from_config_runs_with_and_without_hessian() -> None:
    cfg = load(
        None,
        [
            "optim.optimizer.kind=sophia",
            "optim.optimizer.rho=0.05",
            "optim.optimizer.update_hessian_every=5",
            "optim.schedule.warmup_steps=0",
            "optim.schedule.kind=constant",
            "optim.lr=0.01",
            "train.steps=10",
        ],
    )
    assert cfg.optim.optimizer == SophiaConfig(rho=0.05, update_hessian_every=5)
    tx, _ = optim.build(cfg)
    params = {"layers": {"kernel": jnp.ones((2, 3))}, "norm": {"scale": jnp.ones(3)}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)  # clipped to norm 1 first
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)  # no Hessian yet: h = 0, sign steps
    wd = cfg.optim.weight_decay
    np.testing.assert_allclose(updates["layers"]["kernel"], -0.01 * (1 + wd), rtol=1e-5)
    np.testing.assert_allclose(updates["norm"]["scale"], -0.01, rtol=1e-5)
    hessian = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
    updates, state = jax.jit(lambda g, s, p, h: tx.update(g, s, p, hessian=h, hessian_due=True))(
        grads, state, params, hessian
    )
    # Clipped gradients are 100 / 300 each; h = (1 - 0.99) * 1e6, so the step is
    # lr * m / (rho * h), far inside the clip.
    np.testing.assert_allclose(optax.tree.get(state, "hessian")["norm"]["scale"], 1e4, rtol=1e-6)
    m = 0.035 / 3 * (1 + 0.965)
    np.testing.assert_allclose(updates["norm"]["scale"], -0.01 * m / (0.05 * 1e4), rtol=1e-5)


def test_train_step_feeds_the_gnb_estimate_every_k_steps():
    """In the real train step, step 0 folds (1 - b2) x the GNB estimate of the first
    micro-batch (targets sampled from the model itself) into h; step 1 (not due) keeps h."""
    from maxlm import mesh as mesh_lib, state as state_lib, train_step

    cfg = load(None, [
        "model.vocab_size=64", "model.d_model=32", "model.num_layers=1", "model.num_heads=2",
        "model.mlp_dim=64", "train.seq_len=16", "train.global_batch_size=4",
        "train.grad_accum_steps=2", "train.loss_chunk=8", "optim.optimizer.kind=sophia",
        "optim.optimizer.update_hessian_every=2", "mesh.data=1",
    ])  # fmt: skip
    mesh = mesh_lib.make(cfg.mesh, devices=jax.devices()[:1])
    steps = train_step.build(cfg, mesh)
    state = state_lib.init(cfg, steps.optimizer, steps.blueprint)
    params = state.params
    tokens = np.random.default_rng(0).integers(1, 64, (4, 16), dtype=np.int32)
    batch = {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "segment_ids": np.ones_like(tokens),
        "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1)),
    }
    placed = jax.device_put(batch, steps.batch_sharding)
    first = jax.tree.map(lambda x: x[0], train_step._micro_batches(placed, 2))
    grad_fn = train_step._grad_fn(steps.blueprint.graphdef, 0.0, 8)
    key = jax.random.fold_in(jax.random.key(cfg.run.seed + 2), 0)
    expected = train_step._gnb_hessian(steps.blueprint.graphdef, grad_fn, params, first, key, 8)
    expected = jax.tree.map(np.asarray, expected)

    def sophia_state(state):
        nodes = jax.tree.leaves(
            state.opt_state, is_leaf=lambda x: isinstance(x, ScaleBySophiaState)
        )
        return next(s for s in nodes if isinstance(s, ScaleBySophiaState))

    state, _ = steps.train(state, placed)
    h1 = jax.tree.map(np.asarray, sophia_state(state).hessian)  # the next step donates it
    for got, want in zip(jax.tree.leaves(h1), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(got), 0.01 * want, rtol=1e-5, atol=1e-12)
    assert sum(float(np.sum(x)) for x in jax.tree.leaves(h1)) > 0
    state, _ = steps.train(state, placed)
    for a, b in zip(jax.tree.leaves(sophia_state(state).hessian), jax.tree.leaves(h1), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
