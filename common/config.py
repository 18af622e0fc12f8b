"""The run configuration: keys and defaults live in pyproject.toml's [tool.flwr.app.config].

Flower fuses those defaults with ``--run-config`` overrides into ``context.run_config``;
``Settings`` gives that dict types and checks, so a wrong key or value fails with one
line naming the setting.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent


def defaults() -> dict:
    """The [tool.flwr.app.config] table of this project's pyproject.toml."""
    with open(PROJECT_DIR / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "multi-krum")


class ConfigError(ValueError):
    pass


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` strings as ``--run-config`` reads them: numbers, true/false, else strings."""
    overrides = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        overrides[key.strip()] = _parse_value(raw.strip())
    return overrides


def _parse_value(raw: str):
    if raw in ("true", "false"):
        return raw == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw.strip('"')


def fedrec_home() -> Path:
    """Where runs and simulation partitions go by default (``$FEDREC_HOME``, ``~/.fedrec``)."""
    return Path(os.environ.get("FEDREC_HOME", Path.home() / ".fedrec"))


def partition_root(s: Settings, num_clients: int) -> Path:
    """The simulation partition folder for these settings (``partition-dir`` or a cached one)."""
    if s.partition_dir:
        return Path(s.partition_dir).expanduser()
    spec = json.dumps([s.dataset, s.partition, num_clients, s.skew_alpha, s.seed, s.max_users, s.history_len,
                       simulated_budget(s), "declared-users",
                       "distributed-noise-max-sites"]
                      + ([s.canaries, s.canary_examples] if s.canaries else [])
                      + ([f"gradient-canaries={s.gradient_canaries}"] if s.gradient_canaries else []))
    return fedrec_home() / "partitions" / hashlib.sha256(spec.encode()).hexdigest()[:16]


def simulated_budget(s: Settings) -> tuple[float | None, float]:
    """(ε_max, δ) the simulated users agreed to: ``client-epsilon-max`` and ``delta``, or no
    limit (None) in a run without DP. The partitioner writes it into each client's folder;
    from then on it is the client's own, as in a deployment."""
    return (s.client_epsilon_max if s.dp else None, s.delta)


@dataclass(frozen=True)
class Settings:
    num_server_rounds: int
    fraction_train: float
    min_train_nodes: int
    fraction_evaluate: float
    evaluate_test: bool  # the test split at the last round too (a final configuration's run); else validation only
    seed: int
    run_dir: str
    catalog: str
    # data (simulation partitioning; deployments point each node at its data-dir)
    dataset: str
    partition_dir: str
    partition: str
    skew_alpha: float
    max_users: int
    canaries: int
    canary_examples: int  # training examples per canary user (> 1 audits the user-level claim)
    gradient_canaries: int  # white-box canaries per site in DP-SGD (client/train.py GradientCanaries)
    history_len: int
    # model
    model: str
    model_layers: int
    lora_rank: int
    lora_alpha: float
    lora_targets: str
    lora_layers: int
    lora_train_a: bool
    initial_score_scale: float
    max_length: int
    sequence_length: int  # the sequence tower reads a user's last this-many items (common/sequence.py); 0 = no tower
    sequence_dim: int
    sequence_layers: int
    sequence_dropout: float
    sequence_training: bool  # train the tower alone on whole user sequences, every position (common/sequence.py)
    sequence_projection: int  # the tower reads and writes items in the catalog's top this-many principal directions; 0 = all
    prefix_cache_mb: int  # per model per process: the frozen lower layers' states (common/prefix_cache.py); 0 = off
    frozen_precision: str  # the adapted layers' frozen weight products: auto, float32 or bfloat16 (common.model.frozen_dtype)
    # local training with DP-SGD
    dp: bool
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    client_epsilon_max: float
    accountant: str
    privacy_unit: str  # what one ε protects: "example" or "user" (common/privacy.py UNITS)
    examples_per_user: int  # user-level DP-SGD: at most this many of a sampled user's examples per step; sequence training: all windows
    batch_size: int  # DP-SGD's expected privacy units (examples or users) per step
    local_steps: int
    popularity_prior: bool
    prior_noise_multiplier: float
    count_noise_multiplier: float  # σ_n: the noisy example count each train reply releases (FedAvg's weight)
    eval_noise_multiplier: float  # σ_e: the noisy evaluation sums each evaluate reply releases
    learning_rate: float
    server_learning_rate: float
    server_optimizer: str  # sgd: global += η_s·(aggregate − global); adam: Adam with step η_s on global − aggregate
    bias_learning_rate: float
    scale_learning_rate: float
    # client-level central DP at the server (server/central_dp.py)
    central_dp: bool
    central_noise_multiplier: float
    central_clipping_norm: float
    central_delta: float
    central_population: int  # N, the federation's declared number of clients (0: not declared)
    # SecAgg+: the server sees only the sum of the adapters (server/secure_aggregation.py)
    secure_aggregation: bool
    secagg_num_shares: float
    secagg_reconstruction_threshold: float
    secagg_max_weight: float
    secagg_clipping_range: float
    distributed_noise: bool  # one noisy gradient a round, the noise shared among the sites (client/train.py share_step)
    # reliability: reply checks, robust aggregation, timeouts (server/validation.py, server_app.py)
    max_update_norm: float
    aggregation: str
    trim_fraction: float
    krum_malicious: int
    krum_select: int
    round_timeout: float
    min_replies: int
    # resume RUN_DIR (run-dir) from its last committed round (server/server_app.py)
    resume: bool

    @classmethod
    def from_run_config(cls, run_config: dict) -> Settings:
        values = {}
        known = {f.name.replace("_", "-") for f in fields(cls)}
        unknown = sorted(set(run_config) - known)
        if unknown:
            raise ConfigError(f"run config: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in run_config:
                raise ConfigError(f"run config: missing key {key!r}")
            values[f.name] = _coerce(key, run_config[key], f.type)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(f"run config: {message}")

        require(self.num_server_rounds >= 1, "num-server-rounds must be >= 1")
        require(0 < self.fraction_train <= 1, "fraction-train must be in (0, 1]")
        require(0 <= self.fraction_evaluate <= 1, "fraction-evaluate must be in [0, 1]")
        require(self.min_train_nodes >= 1, "min-train-nodes must be >= 1")
        require(self.partition in ("user", "silo"), "partition must be 'user' or 'silo'")
        require(self.skew_alpha >= 0, "skew-alpha must be >= 0 (0 means IID)")
        require(self.history_len >= 1, "history-len must be >= 1")
        require(self.canaries >= 0, "canaries must be >= 0 (0 = no empirical audit)")
        require(self.canary_examples >= 1, "canary-examples must be >= 1")
        require(self.gradient_canaries >= 0, "gradient-canaries must be >= 0 (0 = none)")
        require(self.canary_examples == 1 or self.privacy_unit == "user",
                f"canary-examples = {self.canary_examples} plants canary users of several examples, which audits "
                "a user-level claim; set privacy-unit = user (an example-level ε says nothing about such a user)")
        require(self.model_layers >= 0, "model-layers must be >= 0 (0 = all of the encoder's layers)")
        require(self.lora_rank >= 1, "lora-rank must be >= 1")
        require(self.lora_layers >= 0, "lora-layers must be >= 0 (0 = every encoder layer)")
        require(self.initial_score_scale > 0, "initial-score-scale must be > 0")
        require(self.max_length >= 16, "max-length must be >= 16")
        require(self.sequence_length >= 0, "sequence-length must be >= 0 (0 = no sequence tower)")
        require(self.sequence_dim >= 2 and self.sequence_dim % 2 == 0,
                "sequence-dim must be an even number >= 2 (the tower's two attention heads split it)")
        require(self.sequence_layers >= 1, "sequence-layers must be >= 1")
        require(0 <= self.sequence_dropout < 1, "sequence-dropout must be in [0, 1)")
        require(not self.sequence_training or self.sequence_length > 0,
                "sequence-training trains the sequence tower on whole user sequences; set sequence-length > 0 "
                "(how many items it reads, e.g. 50)")
        require(not (self.sequence_training and self.dp and self.privacy_unit == "example"),
                "sequence-training makes one DP-SGD sample of a user's whole sequence, every position predicted: "
                "its gradient is that user's, so its unit is the user; set privacy-unit = user (or dp = false)")
        require(self.sequence_projection >= 0, "sequence-projection must be >= 0 (0 = the text embeddings whole)")
        require(not self.sequence_projection or self.sequence_training,
                "sequence-projection is fitted to the catalog's embeddings, which stay put only with sequence-training "
                "(LoRA untrained); set sequence-training = true, or sequence-projection = 0")
        require(self.prefix_cache_mb >= 0, "prefix-cache-mb must be >= 0 (0 = no frozen-prefix cache)")
        require(self.frozen_precision in ("auto", "float32", "bfloat16"),
                f"frozen-precision must be 'auto', 'float32' or 'bfloat16', not {self.frozen_precision!r}")
        require(self.noise_multiplier >= 0, "noise-multiplier must be >= 0")
        require(self.max_grad_norm > 0, "max-grad-norm must be > 0")
        require(0 < self.delta < 1, "delta must be in (0, 1)")
        require(self.client_epsilon_max > 0, "client-epsilon-max must be > 0")
        require(self.accountant in ("prv", "rdp"), "accountant must be 'prv' (tight, the default) or 'rdp'")
        require(self.privacy_unit in ("example", "user"), "privacy-unit must be 'example' or 'user'")
        require(self.examples_per_user >= 1, "examples-per-user must be >= 1")
        require(self.batch_size >= 1, "batch-size must be >= 1")
        require(self.local_steps >= 1, "local-steps must be >= 1")
        require(self.prior_noise_multiplier > 0 or not (self.dp and self.popularity_prior),
                "prior-noise-multiplier must be > 0 when dp and popularity-prior are on")
        require(self.count_noise_multiplier > 0 or not self.dp,
                "count-noise-multiplier must be > 0 when dp is on (the example count is a DP release)")
        require(self.eval_noise_multiplier > 0 or not self.dp,
                "eval-noise-multiplier must be > 0 when dp is on (evaluation metrics are a DP release)")
        require(self.learning_rate > 0, "learning-rate must be > 0")
        require(self.server_learning_rate > 0, "server-learning-rate must be > 0")
        require(self.server_optimizer in ("sgd", "adam"), f"server-optimizer must be 'sgd' or 'adam', not "
                                                          f"{self.server_optimizer!r}")
        require(self.bias_learning_rate >= 0, "bias-learning-rate must be >= 0 (0 = frozen)")
        require(self.scale_learning_rate >= 0, "scale-learning-rate must be >= 0 (0 = frozen)")
        require(not (self.dp and self.noise_multiplier == 0),
                "noise-multiplier 0 gives no privacy; set dp=false to train without DP")
        require(self.central_noise_multiplier > 0, "central-noise-multiplier must be > 0")
        require(self.central_clipping_norm > 0, "central-clipping-norm must be > 0")
        require(0 < self.central_delta < 1, "central-delta must be in (0, 1)")
        require(self.central_population >= 0, "central-population must be >= 0 (0: not declared)")
        require(not (self.central_dp and self.popularity_prior and self.dp),
                "with central-dp the popularity prior is the server's release (each client's histogram scaled to L2 "
                "norm 1, one N(0, σ_h²) on the sum), so a site would send it without noise of its own, which dp = true "
                "does not allow; set dp = false (the central guarantee alone) or popularity-prior = false")
        require(not (self.partition == "user" and self.dp),
                "partition = user is one client per user, and local DP-SGD on one person's own data is local DP: "
                "every client reaches ε ≈ 7 in one round and its noisy histogram swamps the prior. Protect each "
                "person at the server instead, where one client is one user: dp = false central-dp = true "
                "central-population = <the number of users> (client-level DP = user-level DP here); measured on all "
                "943 MovieLens users with fraction-train = 0.1 central-clipping-norm = 0.2 prior-noise-multiplier = 2 "
                "local-steps = 2: user-level ε = 3.5, NDCG@10 0.064 (README, User-level DP)")
        require(not (self.secure_aggregation and self.central_dp),
                "secure-aggregation hides each client's update from the server, and central-dp must clip each "
                "one there; they cannot combine. Client-side DP-SGD (dp = true) does combine with SecAgg+")
        require(not self.secure_aggregation or (self.min_train_nodes >= 2),
                "secure-aggregation needs min-train-nodes >= 2: a sum over one client is that client's update")
        require(0 < self.secagg_num_shares and (self.secagg_num_shares <= 1 or self.secagg_num_shares.is_integer()),
                "secagg-num-shares must be a fraction of the sampled clients in (0, 1] or a whole number")
        require(0 < self.secagg_reconstruction_threshold and (self.secagg_reconstruction_threshold <= 1
                                                              or self.secagg_reconstruction_threshold.is_integer()),
                "secagg-reconstruction-threshold must be a fraction of the shares in (0, 1] or a whole number")
        require(self.secagg_max_weight > 0, "secagg-max-weight must be > 0 (the largest example count weighted)")
        require(self.secagg_clipping_range > 0, "secagg-clipping-range must be > 0")
        require(not self.distributed_noise or (self.dp and self.secure_aggregation),
                "distributed-noise splits σ among the sites, so each site's share carries only σ/√T and is private "
                "only inside SecAgg+'s sum; set dp = true and secure-aggregation = true")
        require(not (self.distributed_noise and self.gradient_canaries),
                "gradient-canaries audit the noise one site adds, which under distributed-noise is by design only its "
                "share σ/√T of the sum's σ; audit a run without distributed-noise")
        require(not self.distributed_noise or self.local_steps == 1,
                f"distributed-noise releases one noisy gradient a round, which the server steps with; local-steps = "
                f"{self.local_steps} would release steps the sum does not cover; set local-steps = 1")
        require(self.max_update_norm > 0, "max-update-norm must be > 0 (the largest L2 norm of a client's update)")
        require(self.aggregation in AGGREGATIONS, f"aggregation must be one of {', '.join(AGGREGATIONS)}")
        require(0 <= self.trim_fraction < 0.5, "trim-fraction must be in [0, 0.5)")
        require(self.krum_malicious >= 0, "krum-malicious must be >= 0")
        require(self.krum_select >= 0, "krum-select must be >= 0 (0 = all but krum-malicious)")
        require(self.round_timeout > 0, "round-timeout must be > 0 (seconds)")
        require(not self.resume or bool(self.run_dir), "resume = true needs run-dir: the run directory to resume")
        require(self.min_replies >= 1, "min-replies must be >= 1 (usable replies a round needs to be applied)")
        require(self.aggregation == "fedavg" or not self.secure_aggregation,
                f"aggregation = {self.aggregation} needs each client's update, which secure-aggregation hides; "
                "use aggregation = fedavg with SecAgg+")
        require(self.aggregation == "fedavg" or not self.central_dp,
                f"aggregation = {self.aggregation} changes what one client can move the aggregate by, which central-dp's "
                "accounting assumes is the clipped sum; use aggregation = fedavg with central DP")

    def expected_clients(self, num_nodes: int) -> int:
        """Clients per round: ``fraction-train`` of the nodes (at least ``min-train-nodes``), as
        Flower's FedAvg samples; with central DP, the expected size of the Poisson sample."""
        return min(num_nodes, max(int(num_nodes * self.fraction_train), self.min_train_nodes))

    def check_population(self, num_nodes: int) -> None:
        """Checks that need the number of clients present. Under central DP the population is the
        declared ``central-population`` N: more clients than N would void δ < 1/N and q = m/N."""
        if not self.central_dp:
            return
        if self.central_population < 1:
            raise ConfigError("run config: central-dp needs central-population = N, the federation's declared number "
                              "of clients: q = m/N and the bound δ < 1/N depend on it, so it cannot be whoever "
                              "connected first")
        if num_nodes > self.central_population:
            raise ConfigError(f"run config: {num_nodes} clients are connected, more than central-population = "
                              f"{self.central_population}, the federation size central DP is accounted for")
        if not self.central_delta < 1 / self.central_population:
            raise ConfigError(f"run config: central-delta = {self.central_delta:g} must be < 1/N = "
                              f"{1 / self.central_population:.4g} for N = central-population = "
                              f"{self.central_population} clients")


def _coerce(key: str, value, kind: str):
    kind = {"int": int, "float": float, "bool": bool, "str": str}[kind]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"run config: {key} must be true or false, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"run config: {key} must be {kind.__name__}, got {value!r}")
    return value
