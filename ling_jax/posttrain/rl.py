"""A small RL loop: rollouts with the KV-cache generator, verifiable rewards, one update each.

    for step in range(rl.num_steps):
        prompts  <- rl.prompts_per_step arithmetic problems (chat prompts, thinking off)
        replies  <- rl.group_size samples per prompt (`Generator`, temperature rl.temperature)
        rewards  <- Evo-CoT: correctness + alpha * length shaping + format penalty
        Â        <- (R - mean_G R) / std_G R
        old_logp <- the sampling policy's log-probs (one update per rollout, so the ratios start
                    at 1 and only their gradients act; clipping matters with rl.updates_per_rollout
                    > 1)
        params   <- AdamW step on rl.loss (grpo | gspo | lpo) + rl.kl_beta * KL(pi || pi_ref)

Expert biases stay frozen (RL batches are too small to steer the load balance). The policy
starts from an SFT (or pretraining) run's latest snapshot, `rl.init_from`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from ling_jax.data.tokenizer import Tokenizer, load_tokenizer
from ling_jax.infer.generator import Generator
from ling_jax.infer.loading import load_checkpoint
from ling_jax.infer.sampling import SamplingConfig
from ling_jax.posttrain import losses, rewards, rollout
from ling_jax.train.loss import token_cross_entropy
from ling_jax.train.optimizer import make_optimizer
from ling_jax.train.schedules import make_schedule
from ling_jax.train.train_step import TrainState, init_train_state, merge_model

LOSSES = ("grpo", "gspo", "lpo")
RL_BATCH_KEYS = ("input_ids", "targets", "positions", "segment_ids", "completion_mask")


def default_rl_config() -> ml_collections.ConfigDict:
    """The `rl` section, every field documented."""
    cfg = ml_collections.ConfigDict()
    # Run directory whose latest snapshot is the starting (and reference) policy.
    cfg.init_from = ""
    # tokenizer.json of that run ("" = <init_from>/tokenizer/tokenizer.json).
    cfg.tokenizer = ""
    cfg.num_steps = 40
    cfg.prompts_per_step = 8
    cfg.group_size = 8  # G: samples per prompt.
    cfg.max_new_tokens = 48
    cfg.temperature = 1.0
    cfg.loss = "lpo"  # "grpo" | "gspo" | "lpo".
    cfg.epsilon = losses.LPO_EPSILON  # Clip range; 0.03 is LPO's (GSPO's paper: ~3e-4).
    cfg.aggregation = "token_mean"  # "token_mean" (LPO) | "sequence_mean" (GRPO/GSPO papers).
    cfg.updates_per_rollout = 1
    cfg.kl_beta = 0.0  # > 0 adds beta * KL(pi || pi_ref) against the starting policy.
    cfg.length_alpha = 0.1  # Evo-CoT's alpha (length shaping); 0 = correctness only.
    cfg.thinking = "off"  # Prompts in instant mode (Evo-CoT starts from it).
    cfg.train_seed = 0  # The arithmetic set the prompts are drawn from.
    cfg.eval_seed = 1_000_003  # A different draw: the held-out problems.
    cfg.eval_problems = 64
    cfg.eval_every_steps = 20
    return cfg


def validate_rl_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the `rl` section once, naming the offending field."""
    checks = {
        "init_from": (bool(cfg.init_from), "a run directory with a snapshot"),
        "loss": (cfg.loss in LOSSES, f"one of {LOSSES}"),
        "aggregation": (cfg.aggregation in losses.AGGREGATIONS, f"one of {losses.AGGREGATIONS}"),
        "group_size": (cfg.group_size >= 2, ">= 2 (advantages compare samples of a prompt)"),
        "prompts_per_step": (cfg.prompts_per_step >= 1, ">= 1"),
        "max_new_tokens": (cfg.max_new_tokens >= 1, ">= 1"),
        "epsilon": (cfg.epsilon > 0, "> 0"),
        "kl_beta": (cfg.kl_beta >= 0, ">= 0"),
        "temperature": (cfg.temperature > 0, "> 0 (RL samples)"),
        "updates_per_rollout": (cfg.updates_per_rollout >= 1, ">= 1"),
        "thinking": (cfg.thinking in ("on", "off"), "'on' or 'off'"),
    }
    for field, (ok, expected) in checks.items():
        if not ok:
            raise ValueError(f"rl.{field} = {cfg[field]!r} is invalid: expected {expected}")
    return cfg


def token_log_probs(graphdef, params, expert_bias, batch) -> jax.Array:
    """log pi(target) at every position: [batch, seq] fp32."""
    model = nnx.merge(graphdef, params, expert_bias)
    output = model(batch["input_ids"], batch["positions"], batch["segment_ids"])
    ce, _ = token_cross_entropy(output.logits, batch["targets"])
    return -ce


def policy_loss(cfg: ml_collections.ConfigDict, pause_ids: np.ndarray) -> Callable:
    """(logp, old_logp, advantages, batch) -> (loss, metrics) for `rl.loss`."""
    kwargs = {"eps": cfg.epsilon, "aggregation": cfg.aggregation}

    def loss(logp, old_logp, advantages, batch):
        mask = batch["completion_mask"]
        if cfg.loss == "grpo":
            return losses.grpo_loss(logp, old_logp, advantages, mask, **kwargs)
        if cfg.loss == "gspo":
            return losses.gspo_loss(logp, old_logp, advantages, mask, **kwargs)
        return losses.lpo_loss(
            logp, old_logp, advantages, mask, batch["reply_tokens"], pause_ids, **kwargs
        )

    return loss


def make_rl_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    cfg: ml_collections.ConfigDict,
    pause_ids: np.ndarray,
) -> Callable:
    """The jitted `rl_step(state, batch, old_logp, ref_logp, advantages) -> (state, metrics)`.

    batch: rollout arrays [rows, seq] (`rollout.rollout_batch`); old_logp, ref_logp: [rows, seq];
    advantages: [rows]. Only `state.params` and the optimizer state change.
    """
    surrogate = policy_loss(cfg, pause_ids)
    beta = float(cfg.kl_beta)

    def rl_step(state: TrainState, batch, old_logp, ref_logp, advantages):
        def loss_fn(params):
            logp = token_log_probs(graphdef, params, state.expert_bias, batch)
            loss, metrics = surrogate(logp, old_logp, advantages, batch)
            # With kl_beta = 0, ref_logp is old_logp: the metric then tracks the drift from the
            # sampling policy instead.
            kl = losses.reference_kl(logp, ref_logp, batch["completion_mask"])
            metrics["kl"] = kl
            metrics["policy_loss"] = loss
            return loss + beta * kl, metrics

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics.update(loss=loss, grad_norm=optax.tree.norm(grads))
        state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
        return state, metrics

    return jax.jit(rl_step, donate_argnums=0)


def evaluate(
    generator: Generator,
    tokenizer: Tokenizer,
    cfg: ml_collections.ConfigDict,
) -> float:
    """Greedy accuracy on the held-out problems (`rl.eval_seed`, `rl.eval_problems`)."""
    prompts = rollout.arithmetic_prompts(
        tokenizer, range(cfg.eval_problems), seed=cfg.eval_seed, thinking=cfg.thinking
    )
    replies = rollout.sample_replies(
        generator,
        tokenizer,
        prompts,
        group_size=1,
        max_new_tokens=cfg.max_new_tokens,
        sampling=SamplingConfig(),
        seed=0,
    )
    return float(rewards.correctness(replies.texts, prompts.answers).mean())


class RLRun:
    """The policy, its reference, the generator and the jitted step of one RL run."""

    def __init__(self, config: ml_collections.ConfigDict, model=None, tokenizer=None):
        self.config = config
        cfg = self.cfg = validate_rl_config(config.rl)
        if model is None:
            model, _ = load_checkpoint(cfg.init_from)
        if tokenizer is None:
            path = cfg.tokenizer or os.path.join(cfg.init_from, "tokenizer", "tokenizer.json")
            tokenizer = load_tokenizer(path, None)
        self.tokenizer = tokenizer
        self.pause_ids = rollout.pause_token_ids(tokenizer)
        schedule = make_schedule(config.schedule, config.optim.peak_lr)
        optimizer = make_optimizer(config.optim, schedule)
        self.generator = Generator(model, pad_id=tokenizer.pad_id)
        self.graphdef, self.state = init_train_state(model, optimizer)
        # The reference policy: the starting weights (a copy; the step donates the state).
        self.ref_params = jax.tree.map(jnp.copy, self.state.params)
        self.step_fn = make_rl_step(self.graphdef, optimizer, cfg, self.pause_ids)
        self.logp_fn = jax.jit(
            lambda params, bias, batch: token_log_probs(self.graphdef, params, bias, batch)
        )

    def sync_generator(self) -> None:
        """Points the generator at the current weights (same shapes: nothing recompiles)."""
        self.generator.state = nnx.split(merge_model(self.graphdef, self.state))[1]

    def evaluate(self) -> float:
        self.sync_generator()
        return evaluate(self.generator, self.tokenizer, self.cfg)

    def step(self, step: int) -> dict[str, float]:
        """One rollout and `rl.updates_per_rollout` updates; returns scalar metrics."""
        cfg = self.cfg
        self.sync_generator()
        first = step * cfg.prompts_per_step
        prompts = rollout.arithmetic_prompts(
            self.tokenizer,
            range(first, first + cfg.prompts_per_step),
            seed=cfg.train_seed,
            thinking=cfg.thinking,
        )
        replies = rollout.sample_replies(
            self.generator,
            self.tokenizer,
            prompts,
            group_size=cfg.group_size,
            max_new_tokens=cfg.max_new_tokens,
            sampling=SamplingConfig(temperature=cfg.temperature),
            seed=step,
        )
        shape = (cfg.prompts_per_step, cfg.group_size)
        answers = np.repeat(prompts.answers, cfg.group_size)
        correct = rewards.correctness(replies.texts, list(answers)).reshape(shape)
        lengths = np.array([len(t) for t in replies.tokens]).reshape(shape)
        has_think = np.array(["<think>" in t for t in replies.texts]).reshape(shape)
        reward = rewards.evo_cot_rewards(correct, lengths, has_think, alpha=cfg.length_alpha)
        advantages = np.asarray(losses.group_advantages(reward)).reshape(-1)
        batch = rollout.rollout_batch(
            prompts, replies, group_size=cfg.group_size, pad_id=self.tokenizer.pad_id
        )
        old_logp = self.logp_fn(self.state.params, self.state.expert_bias, batch)
        ref_logp = (
            self.logp_fn(self.ref_params, self.state.expert_bias, batch)
            if cfg.kl_beta > 0
            else old_logp
        )
        for _ in range(cfg.updates_per_rollout):
            self.state, metrics = self.step_fn(self.state, batch, old_logp, ref_logp, advantages)
        out = {k: float(v) for k, v in jax.device_get(metrics).items()}
        out.update(
            reward=float(reward.mean()),
            accuracy=float(correct.mean()),
            reply_tokens=float(lengths.mean()),
        )
        return out


def train_rl(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs `rl.num_steps` steps, evaluating before, every `rl.eval_every_steps` and after;
    writes one JSON line per step to <workdir>/rl_metrics.jsonl and returns the summary."""
    os.makedirs(workdir, exist_ok=True)
    run = RLRun(config)
    cfg = run.cfg
    summary = {"eval_before": run.evaluate(), "seed": cfg.train_seed, "eval_seed": cfg.eval_seed}
    logging.info("held-out accuracy before RL: %.3f", summary["eval_before"])
    with open(os.path.join(workdir, "rl_metrics.jsonl"), "a") as f:
        for step in range(cfg.num_steps):
            start = time.perf_counter()
            metrics = run.step(step)
            metrics.update(step=step + 1, seconds=time.perf_counter() - start)
            if (step + 1) % cfg.eval_every_steps == 0 and step + 1 < cfg.num_steps:
                metrics["eval_accuracy"] = run.evaluate()
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            logging.info("rl step %d: %s", step + 1, metrics)
    summary["eval_after"] = run.evaluate()
    logging.info("held-out accuracy after RL: %.3f", summary["eval_after"])
    with open(os.path.join(workdir, "rl_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
